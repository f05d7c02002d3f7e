"""What an export target is: the interface every runtime the tool writes for implements.

A target declares its formats (the types it writes), what each costs (exact weight bytes, the KV
cache, the transient buffers: what the cost model prices), whether a model can be exported, and
how to export, check, benchmark and run what it wrote. The rest of the tool (cost model, profile,
pipeline, detect, deploy, CLI) asks a target from the registry (``targets.get``) and never
compares target names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from mosaic_export.core.errors import UserError

CHUNK = 512  # tokens per prefill call (llama.cpp's n_ubatch; the ONNX runner's chunk)

if TYPE_CHECKING:
    import torch

    from mosaic_export.model.folder import LoadedModel


def check_type(noun: str, types: tuple[str, ...], type_: str) -> str:
    """The type, or a UserError naming the ones the target offers."""
    if type_ not in types:
        raise UserError(f"{noun} '{type_}' is not supported; supported: {', '.join(types)}")
    return type_


class Runtime(Protocol):
    """The runtime a profile names (decide.profile.RuntimeSpec): what a target reads of it."""

    target: str
    execution_provider: str | None


@dataclass(frozen=True)
class Evaluation:
    """How a built file is measured in its runtime, in one process: prefill of a prompt, greedy
    decode, the KV cache filled to ``context``, then perplexity over ``eval_windows`` windows of
    ``eval_text`` (0: none, None: all)."""

    eval_text: str | None
    eval_windows: int | None
    eval_seq_len: int = 512
    context: int | None = None
    threads: int | None = None
    prompt_tokens: int = 512
    gen_tokens: int = 128
    # fill the KV cache to ``context`` after the decode, for the peak memory with the context full;
    # a run that only times prefill and decode skips it (llama.cpp still sizes its cache for
    # ``context``; ONNX Runtime's grows with the tokens)
    fill: bool = True

    def benchmark_options(self) -> dict:
        """The runners' benchmark keywords (their command line: --eval-windows -1 is all)."""
        return dict(threads=self.threads, context=self.context,
                    eval_text=self.eval_text if self.eval_windows != 0 else None,
                    eval_windows=-1 if self.eval_windows is None else self.eval_windows,
                    eval_seq_len=self.eval_seq_len, no_fill=not self.fill)

    @classmethod
    def from_args(cls, a) -> Evaluation:
        """From a runner's parsed command line."""
        return cls(a.eval_text, None if a.eval_windows == -1 else a.eval_windows, a.eval_seq_len,
                   a.context, a.threads, a.prompt_tokens, a.gen_tokens, not a.no_fill)


class Target(ABC):
    """One runtime's file format. Class attributes describe it; methods price, write and run it."""

    name: ClassVar[str]  # --target, [runtime] target in a profile, format.target in a manifest
    engine: ClassVar[str]  # the runtime that runs the files, in messages ("llama.cpp")
    option: ClassVar[str]  # "quant" | "dtype": the CLI option, profile key and manifest key of the type
    noun: ClassVar[str]  # what a type is called in messages ("GGUF type")
    types: ClassVar[tuple[str, ...]]  # every type it writes
    search_types: ClassVar[tuple[str, ...]]  # the types a joint search chooses among, largest first
    default_type: ClassVar[str]  # when neither the option nor the profile names one
    profile_keys: ClassVar[dict[str, tuple[str, ...]]] = {}  # more [runtime] keys, with their choices
    nominal_base: ClassVar[int]  # bytes the runtime holds before any weight (nominal calibration)
    packages: ClassVar[tuple[str, ...]] = ()  # Python packages whose versions the manifest records
    scores_perplexity: ClassVar[bool] = True  # benchmark() scores an eval_text (the joint search needs it)
    # deploy() works on a streamed model (model_io.LoadedModel.weights): reads one layer at a time
    streams: ClassVar[bool] = False

    def float32_first(self, type_: str, row_lengths: set[int]) -> bool:
        """Whether exporting the type writes a float32 file of the model first (disk, not memory),
        for weights whose rows (input sizes) have these lengths."""
        return False

    def streamed_types(self) -> tuple[str, ...]:
        """The types deploy() writes from a streamed model (all of them where it streams)."""
        return self.types if self.streams else ()

    def check_type(self, type_: str) -> str:
        return check_type(self.noun, self.types, type_)

    def alignment(self, type_: str) -> int:
        """The multiple a resized layer's channel counts must keep for the type to store them."""
        return 1

    def keeps_kv_heads(self, type_: str) -> bool:
        """Whether plans for this target keep every layer's KV heads by default (--kv-heads)."""
        return False

    # --- what it costs (costmodel.py) -----------------------------------------------------------

    @abstractmethod
    def kv_bytes_per_value(self, type_: str) -> int:
        """Bytes of one cached key or value element."""

    def output_rows(self, tokens: int) -> int:
        """Rows of logits a prompt of ``tokens`` computes (all of them, unless the runtime keeps
        only the last)."""
        return tokens

    def tensor_types(self, loaded: LoadedModel, type_: str) -> dict[str, str] | None:
        """Per-tensor types the exporter will give this model at ``type_``, when they are not all
        ``type_`` (an input of tensor_bytes)."""
        return None

    @abstractmethod
    def tensor_bytes(self, name: str, rows: int, cols: int, type_: str, matmul: bool,
                     tensor_types: dict[str, str] | None) -> int:
        """Exact bytes of one weight tensor (GGUF name, rows x cols) in the file; ``matmul``: a
        matrix multiplied per token (not the embedding table, not a norm)."""

    def tied_output_bytes(self, rows: int, cols: int, type_: str) -> int:
        """For tied embeddings: bytes of the separate output matrix the file stores, 0 when the
        runtime multiplies by the embedding table itself."""
        return 0

    # --- building (pipeline.py, detect.py) ---------------------------------------------------------

    @abstractmethod
    def check_exportable(self, loaded: LoadedModel) -> None:
        """UserError when the model cannot be written in this format (before any work)."""

    def check_layer_sizes(self, loaded: LoadedModel, may_differ: bool) -> None:
        """UserError when layers of different sizes (``may_differ``: the plan may make them) cannot
        be written for this model's architecture; the message says what works instead. By
        default a format holds any sizes."""
        return None

    @abstractmethod
    def artifact_name(self, type_: str) -> str:
        """The file or folder name the model at ``type_`` is written to, inside OUT."""

    @abstractmethod
    def export(self, loaded: LoadedModel, path: Path, type_: str) -> None:
        """Write the model at ``type_`` to path (artifact_name's file or folder)."""

    @abstractmethod
    def benchmark(self, path: Path, **options) -> dict:
        """Run the artifact in its runtime once (a fresh process): file_bytes, decode and prefill
        tokens/s, peak_rss_bytes, context, and perplexity when an eval_text is given. Options:
        Evaluation.benchmark_options() and measure_options(); with ``no_fill`` the KV cache is not
        filled to ``context`` after the decode, and the result says so ("filled": false: its
        peak memory is not the figure with the context full). The tool measures in rounds of
        such runs (benchmarks.py)."""

    def measure_options(self, runtime: Runtime | None) -> dict:
        """benchmark() options the profile's runtime asks for (an execution provider), for every
        run of the rounds; none by default."""
        return {}

    @abstractmethod
    def deploy(self, loaded: LoadedModel, path: Path, type_: str, parity_ids: torch.Tensor,
               runtime: Runtime, evaluation: Evaluation, log) -> dict:
        """Export and check the artifact against PyTorch (UserError under the type's floor;
        ``evaluation``: the threads): the report's section for this target, holding "parity".
        Its speed, memory and perplexity are measured next, in rounds (the pipeline adds them
        under "benchmark" and "measured")."""

    # --- the deployable folder (readme.py, verify.py, generate.py) -----------------------------

    @abstractmethod
    def manifest_format(self, section: dict) -> dict:
        """The manifest's format entry from the report's section: the type under ``option`` and
        ``model_path`` (relative to OUT), with anything else an app needs."""

    @abstractmethod
    def verify_parity(self, loaded: LoadedModel, path: Path, fmt: dict, ids: torch.Tensor,
                      recorded: dict, threads: int | None) -> tuple[dict, float]:
        """The build's parity check again on the recorded ids: (the result, with top1_agreement,
        positions and max_abs_logit_diff; the type's floor). UserError on a check other than the
        agreement floor (which verify applies)."""

    @abstractmethod
    def generate(self, path: Path, prompt: str, max_tokens: int, chat: bool, threads: int | None) -> str:
        """Greedy generation with the runtime (the chat template when the model has one and chat)."""

    @abstractmethod
    def readme_run(self, fmt: dict) -> list[str]:
        """The app README's "Run it" section (Markdown lines) for the manifest's format entry."""

    def bytes_per_token(self, path: Path) -> int:
        """Bytes of the weights the runtime reads to generate one token, read from the written
        artifact (tools/bench_speed.py: the ideal speed-up of a pruned model)."""
        raise UserError(f"target '{self.name}' cannot read its weight bytes per token from a file")

    def report_notes(self, section: dict) -> list[str]:
        """Markdown lines for report.md about how the runtime ran (none by default)."""
        return []

    def reads(self, path: Path) -> Path | None:
        """The artifact ``mosaic-export bench`` should run when given path, if it is this
        target's (a file or folder it wrote, or a file inside that folder); else None."""
        return None

    def summary_rows(self, section: dict) -> list[tuple[str, str, str]]:
        """Rows (figure, dense, pruned) for the run's summary table; the runtime's figures: speed
        and memory as medians over the rounds with their 95% intervals (section["measured"])."""
        b, m = section["benchmark"], section.get("measured")
        rows = []
        if m:
            f = m["figures"]
            rounds = "1 round" if m["rounds"] == 1 else f"{m['rounds']} rounds"
            rows = [(f"{self.engine} decode tokens/s ({rounds})", "",
                     _interval(f["decode"], "{:.1f}")),
                    (f"{self.engine} prefill tokens/s", "", _interval(f["prefill"], "{:.1f}")),
                    (f"{self.engine} peak RSS", "", _interval(f["memory"], "{:.1f}", 2**20) + " MiB")]
        return rows + ([(f"{self.engine} perplexity", "", f"{b['perplexity']['perplexity']:.3f}")]
                       if "perplexity" in b else [])


def _interval(iv: dict, fmt: str, scale: float = 1.0) -> str:
    """'145.7 [140.1, 150.2]': a median and its interval."""
    return (f"{fmt.format(iv['median'] / scale)} [{fmt.format(iv['low'] / scale)}, "
            f"{fmt.format(iv['high'] / scale)}]")

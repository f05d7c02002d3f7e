"""Built models measured in their runtime: exported in a format, then run in interleaved rounds
(measure/rounds.py), each run in a fresh process. Every speed or memory figure of the tool comes
from here: profile detect's widths, the joint search's dense types, the chosen plan against the
dense model (the verdict), the neighbour plan, `mosaic-export bench`, the tools.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING

from .costmodel import Format
from .measure.rounds import Measurement, Policy, interleaved

if TYPE_CHECKING:
    from .model_io import LoadedModel
    from .plan import Plan
    from .run_config import RunConfig
    from .targets.base import Evaluation


def export_format(loaded: LoadedModel, fmt: Format, work: Path) -> Path:
    """Export the model in the format into ``work``; the file (or folder) written."""
    target = fmt.spec
    path = work / target.artifact_name(fmt.name)
    work.mkdir(parents=True, exist_ok=True)
    target.export(loaded, path, fmt.name)
    return path


def runner(fmt: Format, path: Path, context: int | None, threads: int | None,
           first: Evaluation | None = None, fill_rounds: int = 1, **options) -> Callable[[int], dict]:
    """A candidate of measure.rounds.interleaved: round r runs the format's benchmark of ``path``
    in a fresh process. The first ``fill_rounds`` rounds fill the KV cache to ``context`` after
    the decode (the peak memory with the context full: measured there); later rounds time
    prefill and decode alone, the cache sized the same (a third of the time: more rounds for the
    speed figures, which are the noisy ones). With ``first``, the first round also scores the
    perplexity (after the timed part, so its figures are like the others')."""
    def run(r: int) -> dict:
        fill = {"context": context, "no_fill": r >= fill_rounds}
        if r == 0 and first is not None:
            return fmt.spec.benchmark(path, **{**first.benchmark_options(), **fill}, **options)
        return fmt.spec.benchmark(path, threads=threads, eval_text=None, eval_windows=0, **fill, **options)

    return run


def measure(files: dict[Hashable, tuple[Format, Path]], policy: Policy, context: int | None,
            threads: int | None = None, reference: Hashable | None = None,
            first: Evaluation | None = None, log=None, **options) -> Measurement:
    """Every file in its runtime, in interleaved rounds (ratios against ``reference``); memory is
    measured in the policy's least rounds, speed in every round, the perplexity (``first``) in the
    first (runner); ``options``: more benchmark() options for every run (an execution provider)."""
    runs = {key: runner(fmt, path, context, threads, first, policy.least, **options)
            for key, (fmt, path) in files.items()}
    return interleaved(runs, policy, reference, log=log)


def median_run(m: Measurement, key: Hashable) -> dict:
    """A candidate's first run (its perplexity, file size, ...) with its speed and memory replaced
    by the medians over the rounds, and the rounds' intervals under "measured"."""
    first = dict(m.runs[key][0])
    decode, prefill, memory = (m.figure(key, metric).median for metric in ("decode", "prefill", "memory"))
    first["decode"] = {**first["decode"], "tokens_per_s": decode}
    first["prefill"] = {**first["prefill"], "tokens_per_s": prefill,
                        "seconds": first["prefill"]["tokens"] / prefill}
    first["peak_rss_bytes"] = memory
    first["measured"] = m.to_dict(key)
    return first


def measure_beside(config: RunConfig, built: tuple[Format, Path],
                   others: dict[str, tuple[Format, Plan | Path | None]], reference: str | None,
                   context: int | None, first: Evaluation | None = None, options: dict | None = None,
                   log=print) -> Measurement:
    """The built file ("plan": its format and path) and, beside it in the same rounds, each of
    ``others``: a file already exported (a Path), or the source model cut to a plan (None: the
    dense model itself; sizes are what cost) exported in its format into a temporary folder;
    ratios against ``reference``; the built file's perplexity scored in the first round
    (``first``: the evaluation)."""
    from .model_io import load_model
    from .prune.apply import resize_to_plan

    files = {"plan": built}
    with tempfile.TemporaryDirectory(prefix=".measure-", dir=built[1].parent) as tmp:
        for name, (fmt, plan) in others.items():
            if isinstance(plan, Path):
                files[name] = (fmt, plan)
                continue
            log(f"exporting the {'dense model' if plan is None else name + ' plan'} as {fmt.key}, to "
                "measure beside the plan")
            loaded = load_model(config.model, stream=config.stream)
            if plan is not None:
                resize_to_plan(loaded, plan)
            files[name] = (fmt, export_format(loaded, fmt, Path(tmp) / name))
            del loaded
        log(f"measuring {', '.join(files)} in interleaved rounds")
        runs = {key: runner(fmt, path, context, config.threads, first if key == "plan" else None,
                            config.rounds.least, **(options or {})) for key, (fmt, path) in files.items()}
        return interleaved(runs, config.rounds, reference, log=log)


def export_reference(config: RunConfig, loaded: LoadedModel, fmt: Format, relative: bool) -> Path | None:
    """The dense model in the format relative budgets are relative to, exported beside OUT before
    anything is pruned (no second copy of the model held later), in a temporary folder the run
    removes (``.OUT.tmp-PID-reference-*``); None without a relative budget or a target."""
    from .outputs import TMP_INFIX

    if not relative or config.target is None or config.out is None:
        return None
    out = config.out.resolve()
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}{os.getpid()}-reference-", dir=out.parent))
    return export_format(loaded, fmt, folder)

"""Built models measured in their runtime: exported in a format, then run in interleaved rounds
(measure/rounds.py), each run in a fresh process. Every speed or memory figure of the tool comes
from here: profile detect's widths, the joint search's dense types, the chosen plan against the
dense model (the verdict), the neighbour plan, `mosaic-export bench`, the tools.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING

from mosaic_export.decide.costmodel import Format
from mosaic_export.measure.rounds import Measurement, Policy, interleaved

if TYPE_CHECKING:
    from mosaic_export.model.folder import LoadedModel
    from mosaic_export.targets.base import Evaluation


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

"""The built model measured beside its references, in the same interleaved rounds: the dense model
(relative budgets are relative to it), exported before anything is pruned, and the neighbour plan."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mosaic_export.bundle.outputs import TMP_INFIX
from mosaic_export.decide import benchmarks
from mosaic_export.decide.costmodel import Format
from mosaic_export.measure.rounds import Measurement, interleaved
from mosaic_export.method.plan import Plan
from mosaic_export.method.prune.apply import resize_to_plan
from mosaic_export.model.folder import LoadedModel
from mosaic_export.model.load import load_model

if TYPE_CHECKING:
    from mosaic_export.run.config import RunConfig
    from mosaic_export.targets.base import Evaluation


def measure_beside(config: RunConfig, built: tuple[Format, Path],
                   others: dict[str, tuple[Format, Plan | Path | None]], reference: str | None,
                   context: int | None, first: Evaluation | None = None, options: dict | None = None,
                   log=print) -> Measurement:
    """The built file ("plan": its format and path) and, beside it in the same rounds, each of
    ``others``: a file already exported (a Path), or the source model cut to a plan (None: the
    dense model itself; sizes are what cost) exported in its format into a temporary folder;
    ratios against ``reference``; the built file's perplexity scored in the first round
    (``first``: the evaluation)."""
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
            files[name] = (fmt, benchmarks.export_format(loaded, fmt, Path(tmp) / name))
            del loaded
        log(f"measuring {', '.join(files)} in interleaved rounds")
        runs = {key: benchmarks.runner(fmt, path, context, config.threads, first if key == "plan" else None,
                            config.rounds.least, **(options or {})) for key, (fmt, path) in files.items()}
        return interleaved(runs, config.rounds, reference, log=log)


def export_reference(config: RunConfig, loaded: LoadedModel, fmt: Format, relative: bool) -> Path | None:
    """The dense model in the format relative budgets are relative to, exported beside OUT before
    anything is pruned (no second copy of the model held later), in a temporary folder the run
    removes (``.OUT.tmp-PID-reference-*``); None without a relative budget or a target."""
    if not relative or config.target is None or config.out is None:
        return None
    out = config.out.resolve()
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}{os.getpid()}-reference-", dir=out.parent))
    return benchmarks.export_format(loaded, fmt, folder)

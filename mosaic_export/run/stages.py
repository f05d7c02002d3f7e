"""What each stage of a run hands the next (Dense, Pruned, Recovered, Exported; DensePass: what
the runs of a sweep share), and the run's Report (bundle/record.py) made from them at the end."""

from __future__ import annotations

import dataclasses
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mosaic_export.bundle.record import Memory, Perplexities, Report
from mosaic_export.decide.costmodel import Format, Pricing
from mosaic_export.decide.joint import JointResult
from mosaic_export.decide.profile import Profile
from mosaic_export.decide.search import SearchResult
from mosaic_export.measure.process import peak_rss_bytes
from mosaic_export.measure.tree import MemoryLimit
from mosaic_export.method.evaluate import Perplexity
from mosaic_export.method.plan import Plan
from mosaic_export.model.folder import LoadedModel
from mosaic_export.run.config import Inputs, RunConfig


@dataclass(frozen=True)
class Dense:
    """Load: the model, its pricing in the target's format, the texts, the dense figures."""

    loaded: LoadedModel  # pruned in place by the next stage
    profile: Profile  # relative budgets resolved against the dense model's predicted figures
    pricing: Pricing | None  # None without a target or a search
    counts: dict
    eval_ids: torch.Tensor | None
    calib: torch.Tensor
    perplexity: Perplexity | None
    load_s: float
    need_bytes: int | None = None  # a streamed run: the peak memory.run_needs expects
    reference: Path | None = None  # the dense model in the format of relative budgets, exported


@dataclass(frozen=True)
class DensePass:
    """What the runs of a sweep share, made once (sweep.dense_pass): pass 1 over the dense model
    (the outlier ratios and scores every plan is made from) and the dense perplexity."""

    measured: list  # a pod.LayerMeasurement per layer
    perplexity: Perplexity | None
    params: int  # the dense model's, all of them (what a run's memory is sized from)


@dataclass(frozen=True)
class Pruned:
    """Plan (or search) and apply: the plan, how it was found, the resized model's figures."""

    plan: Plan
    fmt: Format  # the joint search may choose another type than the one asked for
    pricing: Pricing | None
    found: SearchResult | None
    joint: JointResult | None
    counts: dict
    prune_s: float
    peak_rss_bytes: int
    perplexity: Perplexity | None


@dataclass(frozen=True)
class Recovered:
    record: dict  # recover_model's: text, tokens, steps, losses, time
    perplexity: Perplexity | None


@dataclass(frozen=True)
class Exported:
    """Export and measure on the runtime: the files in the folder, what was checked and measured."""

    reload: dict
    runtime: dict | None  # the target's report section (parity, benchmark); None for --target none
    cost: dict | None
    joint_measured: dict | None
    peak_rss_bytes: int  # the whole run's, up to here



def make_report(config: RunConfig, inputs: Inputs, dense: Dense, pruned: Pruned,
                recovered: Recovered | None, exported: Exported, watch: MemoryLimit | None = None) -> Report:
    """The run's Report, from the stages' results (``watch``: the process tree's peak, sampled, up
    to the report, when --max-rss watches it); nothing edits it after."""
    loaded, fmt, plan = dense.loaded, pruned.fmt, pruned.plan
    memory = Memory(peak_rss_bytes(),  # the whole run's high-water mark, all work done but writing
                    pruned.peak_rss_bytes, 4 * dense.counts["total"], 4 * pruned.counts["total"],
                    loaded.weights is not None, dense.need_bytes,
                    watch.peak if watch else None, watch.limit if watch else None)
    perplexities = None
    if dense.perplexity is not None:
        final = recovered.perplexity if recovered else pruned.perplexity
        perplexities = Perplexities(dense.perplexity, final, pruned.perplexity if recovered else None)
    return Report(
        profile=dense.profile.to_dict(),
        model={"source": loaded.source, "shape": loaded.shape.to_dict()},
        format={"target": fmt.target, "type": fmt.name} if config.target else None,
        settings=asdict(plan.settings if pruned.joint else inputs.settings),
        params={"dense": dense.counts, "pruned": pruned.counts, "planned": plan.params()},
        timing={"load_s": dense.load_s, "prune_s": pruned.prune_s,
                **({"joint_s": pruned.joint.seconds} if pruned.joint else {})},
        memory=memory,
        budgets=dataclasses.asdict(dense.profile.budgets),
        layers=[lp.dims.__dict__ for lp in plan.layers],
        environment={"python": sys.version.split()[0], "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "machine": platform.machine()},
        reload=exported.reload,
        perplexity=perplexities,
        recovery=recovered.record if recovered is not None else None,
        joint={**pruned.joint.to_dict(), "measured": exported.joint_measured} if pruned.joint else None,
        runtime=exported.runtime,
        cost=exported.cost,
    )

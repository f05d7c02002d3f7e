"""The main job, usable from Python: profile + model -> plan -> pruned, resized checkpoint + report.

    from mosaic_export.run.pipeline import RunConfig, run
    report = run(RunConfig(profile="laptop-cpu", settings=PruneSettings(sparsity=0.3), out=Path("out")))

Everything the user hands in is checked before any work starts; the output folder is written
under a temporary name beside it and moved into place only when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mosaic_export.bundle.deploy import bundle
from mosaic_export.bundle.outputs import TMP_INFIX, check_free_space, write_outputs
from mosaic_export.bundle.report import log_summary
from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import corpus
from mosaic_export.core.units import format_bytes
from mosaic_export.decide import benchmarks
from mosaic_export.decide.costmodel import Format, Pricing
from mosaic_export.decide.joint import JointResult, joint_check, joint_search
from mosaic_export.decide.profile import Profile
from mosaic_export.decide.search import (
    SearchResult,
    cost_section,
    make_pricing,
    resolve_budgets,
    search,
    search_summary,
)
from mosaic_export.decide.verdict import measured_section
from mosaic_export.measure.process import large_buffers_mapped, peak_rss_bytes, torch_threads
from mosaic_export.measure.tree import MemoryLimit, active, limited
from mosaic_export.method.calibration import tokenize
from mosaic_export.method.evaluate import perplexity, windows
from mosaic_export.method.passes import apply_to_model, measure_model
from mosaic_export.method.plan import Plan
from mosaic_export.method.planner import layers_may_differ, make_plan
from mosaic_export.method.recover import recover_model, recovery_state_dir
from mosaic_export.method.windows import calibration_ids
from mosaic_export.model.checkpoint import reload_check, reload_shapes, save_checkpoint
from mosaic_export.model.folder import LoadedModel
from mosaic_export.model.load import decoder_counts, load_model
from mosaic_export.run import beside, cluster, replay
from mosaic_export.run.config import Inputs, RunConfig, check_lengths, prepare
from mosaic_export.run.memory import check_max_rss
from mosaic_export.run.stages import Dense, DensePass, Exported, Pruned, Recovered, make_report
from mosaic_export.targets.base import Evaluation


def make_or_load_plan(config: RunConfig, loaded: LoadedModel, inputs: Inputs,
                      calib: torch.Tensor, profile: Profile | None = None,
                      pricing: Pricing | None = None, log=print, measured: list | None = None
                      ) -> tuple[Plan, SearchResult | JointResult | None]:
    """The plan given, or one made from pass 1 (``measured``: its result, made once for a
    sweep): at settings.sparsity, or, with config.search, at the least removal whose predicted
    cost meets the profile's budgets (with config.types, the joint search over types, structure
    and recovery: a JointResult)."""
    settings, plan = inputs.settings, inputs.plan
    if plan is not None:
        if plan.model["shape"] != loaded.shape.to_dict():
            raise UserError("the plan was made for a model of another shape: "
                            f"{plan.model['shape']} vs {loaded.shape.to_dict()}")
        return plan, None
    if measured is None:
        measured = measure_model(loaded, calib, settings, config.calib_batch_size,
                                 settings.error_kinds(config.search))
    if not config.search:
        return make_plan(loaded.shape, loaded.source, measured, settings), None
    if config.types:
        remote = None
        if config.ray:  # the dense types run on the cluster, one task each
            params = sum(p.numel() for p in loaded.model.parameters())
            remote = functools.partial(cluster.measure_types, config, params)
        joint = joint_search(config, loaded, measured, settings, profile, calib, log, remote)
        return joint.chosen.candidate.plan, joint
    found = search(loaded.shape, loaded.source, measured, settings, profile.budgets, pricing,
                   config.margin)
    return found.chosen.plan, found


def run_plan(config: RunConfig) -> tuple[Plan, SearchResult | None]:
    """Dry run: the plan (searched for when config.search) and its parameter counts; prunes
    nothing."""
    inputs = prepare(config)
    loaded = load_model(config.model)
    check_lengths(config, loaded, inputs.settings, evaluate=False)
    profile, pricing = inputs.profile, None
    if config.search or profile.budgets.relative:
        pricing = make_pricing(profile, inputs.fmt, loaded)
    profile = resolve_budgets(profile, pricing)
    plan, found = make_or_load_plan(config, loaded, inputs, calibration_ids(loaded, inputs.settings),
                                    profile, pricing)
    return plan, found


# --- the main job, stage by stage: load -> plan (or search) and apply -> recover -> export and
# measure on the runtime -> bundle. Each stage returns a frozen result; the report is made from them.


def run(config: RunConfig, log=print, shared: DensePass | None = None) -> dict:
    """Prune, save, reload-check and evaluate; returns the report (also written to OUT).
    ``shared``: the dense pass of a sweep, instead of making it again."""
    if config.out is None:
        raise UserError("an output folder is needed (--out)")
    inputs = prepare(config)
    # a streamed run's work: its calibration states, the layers a pass writes (clean_stale finds it)
    work = Path(tempfile.mkdtemp(prefix=f".{config.out.name}{TMP_INFIX}{os.getpid()}-layers-",
                                 dir=config.out.resolve().parent)) if config.stream else None
    # under --max-rss the resident set kept to what is held, at some speed (process.py), and the
    # whole process tree (this process and its runtime children) held to the limit (measure/tree.py)
    with torch_threads(config.threads), large_buffers_mapped(config.max_rss is not None), \
            limited(config.max_rss, armed=False) as watch:  # armed once the door's estimate passed
        dense = None
        try:
            dense = load_stage(config, inputs, log, shared, work)
            if dense.pricing is not None:  # measured beside the build, for relative budgets
                dense = dataclasses.replace(dense, reference=beside.export_reference(
                    config, dense.loaded, dense.pricing.fmt, bool(dense.profile.budgets.relative)))
            reports = _prune_and_write(config, inputs, dense, log, shared, watch)
        finally:  # with what was not moved into the checkpoint
            for folder in (work, dense and dense.reference and dense.reference.parent):
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
    log_summary(reports[0], config.out, log)
    return reports[0]


def _prune_and_write(config: RunConfig, inputs: Inputs, dense: Dense, log,
                     shared: DensePass | None, watch: MemoryLimit | None = None) -> list[dict]:
    pruned = prune_stage(config, inputs, dense, log, shared)
    recovered = recover_stage(config, dense, pruned, log)
    reports = []

    def build(folder: Path) -> None:
        exported = export_stage(config, dense, pruned, folder, log)
        reports.append(make_report(config, inputs, dense, pruned, recovered, exported, watch).to_dict())
        replay.write(folder, config)
        bundle(reports[0], pruned.plan, folder, dense.calib[0].tolist())

    write_outputs(config.out, config.force, build, log)
    return reports


def load_stage(config: RunConfig, inputs: Inputs, log=print, shared: DensePass | None = None,
               work: Path | None = None) -> Dense:
    """``work``: a streamed run's folder for what it keeps on disk (LayerWeights.work)."""
    log(f"profile {inputs.profile.name}: {inputs.profile.description}")
    t0 = time.perf_counter()
    loaded = load_model(config.model, stream=config.stream)
    if loaded.weights is not None:
        loaded.weights.work = work
    load_s = time.perf_counter() - t0
    check_lengths(config, loaded, inputs.settings)
    if any(d.n_head == 0 for d in loaded.layer_dims):
        raise UserError(f"{loaded.source} already has removed blocks: prune the model it was made from")
    blocks = inputs.settings.structure == "blocks" or (
        inputs.plan is not None and any(not lp.q_heads for lp in inputs.plan.layers))
    if blocks and not loaded.spec.supports_blocks():
        raise UserError(f"--structure blocks needs Llama-like layers (one norm before each block); "
                        f"{loaded.shape.model_type} has {', '.join(loaded.spec.norms)}")
    log(f"model {loaded.source}: {loaded.shape.model_type}, {loaded.shape.n_layers} layers "
        f"(loaded in {load_s:.1f} s)")
    pricing = None
    if config.target is not None or config.search:  # before any pruning: can it be exported?
        pricing = make_pricing(inputs.profile, inputs.fmt, loaded,
                               strict=config.search or "context" in config.budgets)
        inputs.fmt.spec.check_layer_sizes(loaded, layers_may_differ(inputs.settings, inputs.plan))
    profile = resolve_budgets(inputs.profile, pricing, log)
    eval_ids = None
    if config.eval_windows != 0:
        eval_ids = windows(tokenize(loaded.tokenizer, corpus(config.eval_text)),
                           config.eval_seq_len, config.eval_windows, config.eval_text)
    windows_n = 0 if eval_ids is None else len(eval_ids)
    need = check_max_rss(config, loaded, inputs.settings, windows_n, pricing) if loaded.weights else None
    if need is not None:
        log(f"streamed: the decoder layers read from disk one at a time; {format_bytes(need)} needed")
    if active() is not None:  # --max-rss: enforced from here on
        active().arm()
    calib = calibration_ids(loaded, inputs.settings, recovery_state_dir(config.out), config.device)
    ppl = shared.perplexity if shared else _perplexity(config, loaded, eval_ids, "dense")
    return Dense(loaded, profile, pricing, decoder_counts(loaded), eval_ids, calib, ppl, load_s, need)


def prune_stage(config: RunConfig, inputs: Inputs, dense: Dense, log=print,
                shared: DensePass | None = None) -> Pruned:
    loaded, fmt, pricing = dense.loaded, inputs.fmt, dense.pricing
    t0 = time.perf_counter()
    plan, found = make_or_load_plan(config, loaded, inputs, dense.calib, dense.profile, pricing,
                                    log, shared and shared.measured)
    joint = None
    if isinstance(found, JointResult):  # the type is the search's choice
        joint, found = found, found.search
        fmt, pricing = Format(fmt.target, joint.chosen.type), joint.pricings[joint.chosen.type]
    if found is not None:
        log(search_summary(found))
    spilled = 0 if loaded.weights is None else dense.calib.numel() * loaded.shape.hidden * 4  # states
    check_free_space(config.out, plan, pricing, dense.counts["total"], spilled)
    if loaded.weights is not None:  # each pruned layer written as its checkpoint shard
        loaded.weights.sink = loaded.weights.work
    apply_to_model(loaded, plan, dense.calib, config.calib_batch_size)
    if loaded.weights is not None:
        loaded.weights.finish()
    prune_s = time.perf_counter() - t0 - (joint.seconds if joint else 0.0)  # the search timed alone
    peak = peak_rss_bytes()
    counts = decoder_counts(loaded)
    expected = plan.params()["decoder_resized"]
    if counts["decoder"] != expected:
        raise RuntimeError(f"resized model has {counts['decoder']} decoder parameters, "
                           f"the plan says {expected}")
    ppl = _perplexity(config, loaded, dense.eval_ids, "pruned")
    return Pruned(plan, fmt, pricing, found, joint, counts, prune_s, peak, ppl)


def recover_stage(config: RunConfig, dense: Dense, pruned: Pruned, log=print) -> Recovered | None:
    if config.recover is None:
        return None
    if pruned.joint is not None and not pruned.joint.chosen.recovered:
        log("recovery skipped: the joint search chose a model without pruning")
        return None
    record = recover_model(config.recover, config.model, config.out, dense.loaded, config.resume,
                           config.device, log)
    return Recovered(record, _perplexity(config, dense.loaded, dense.eval_ids, "recovered"))


def export_stage(config: RunConfig, dense: Dense, pruned: Pruned, folder: Path, log=print) -> Exported:
    """The checkpoint (reloaded and compared), the runtime file (checked against PyTorch, its
    perplexity scored), then measured in rounds beside the dense model (and the neighbour plan),
    and the budgets judged on those rounds."""
    loaded, fmt, pricing = dense.loaded, pruned.fmt, pruned.pricing
    save_checkpoint(loaded, folder / "model")
    if loaded.weights is None:
        reload = reload_check(loaded, folder / "model", dense.calib[:1, :128])
    else:
        reload = reload_shapes(loaded, folder / "model")
    runtime = None
    if config.target is not None:
        target = fmt.spec
        runtime = target.deploy(loaded, folder / target.artifact_name(fmt.name), fmt.name, dense.calib[0],
                                dense.profile.runtime, Evaluation(None, 0, threads=config.threads), log)
    cost = None
    if pricing is not None:
        cost = cost_section(dense.profile, pricing, pruned.plan, pruned.found, config.margin)
    if runtime is not None:
        evaluation = Evaluation(config.eval_text, config.eval_windows, config.eval_seq_len, pricing.context,
                                config.threads)  # the perplexity, scored in the first round
        m = measure_built(config, dense, pruned, folder / fmt.spec.artifact_name(fmt.name), evaluation, log)
        runtime["benchmark"], runtime["measured"] = benchmarks.median_run(m, "plan"), m.to_dict("plan")
        if cost is not None:
            budgets = dense.profile.budgets
            cost["measured"] = measured_section(budgets, m, "plan")
            cost["measured"]["reference_format"] = m.reference and (dense.pricing or pricing).fmt.key
            if "neighbour" in m.runs:
                cost["neighbour_measured"] = {"removed": pruned.found.neighbour.plan.removed(),
                                              **measured_section(budgets, m, "neighbour")}
    measured = joint_check(pruned.joint, runtime, dense.perplexity) if pruned.joint else None
    return Exported(reload, runtime, cost, measured, peak_rss_bytes())


def measure_built(config: RunConfig, dense: Dense, pruned: Pruned, built: Path, evaluation: Evaluation,
                  log=print):
    """The built file in its runtime, in interleaved rounds (its perplexity in the first), with:
    the dense model in the format relative budgets are relative to (the profile's, whatever type
    was built; exported before pruning) as the reference (the built file when it is that model),
    and the plan with 5% less pruning with --check-neighbour."""
    found, fmt = pruned.found, pruned.fmt
    relative = bool(dense.profile.budgets.relative)
    ref_fmt = dense.pricing.fmt if dense.pricing is not None else fmt
    others: dict = {}
    is_dense = pruned.counts["decoder"] == pruned.plan.params()["decoder_dense"] and ref_fmt == fmt
    if relative and not is_dense:
        others["dense"] = (ref_fmt, dense.reference)
    if config.check_neighbour and found is not None and found.neighbour is not None:
        others["neighbour"] = (fmt, found.neighbour.plan)
    reference = "dense" if "dense" in others else ("plan" if relative else None)
    return beside.measure_beside(config, (fmt, built), others, reference, evaluation.context, evaluation,
                                     fmt.spec.measure_options(dense.profile.runtime), log)


def _perplexity(config: RunConfig, loaded: LoadedModel, eval_ids: torch.Tensor | None, which: str):
    if eval_ids is None:
        return None
    return perplexity(loaded.model, eval_ids, config.eval_text, desc=f"perplexity ({which})",
                      streamed=loaded if loaded.weights is not None else None)

"""The main job, usable from Python: profile + model -> plan -> pruned, resized checkpoint + report.

    from mosaic_export.pipeline import RunConfig, run
    report = run(RunConfig(profile="laptop-cpu", settings=PruneSettings(sparsity=0.3), out=Path("out")))

Everything the user hands in is checked before any work starts; the output folder is written
under a temporary name beside it and moved into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .calibration import LayerStream, sample_windows, tokenize
from .costmodel import Format, Pricing
from .deploy import finalize
from .errors import UserError
from .evaluate import perplexity, windows
from .joint import JointResult
from .model_io import LoadedModel, load_model, save_checkpoint
from .plan import Plan, PruneSettings, make_plan
from .process import peak_rss_bytes, release_memory
from .profile import Profile, load_profile
from .prune.apply import apply_plan, measure
from .recover import RecoverSettings, resolve_device
from .report import (
    budget_table,
    cost_plot,
    front_plot,
    pod_heatmap,
    recovery_plot,
    summary_table,
    write_markdown,
)
from .search import SearchResult, check_budgets, cost_checks, search
from .texts import BUILTIN, HELDOUT, SELF, corpus
from .units import format_bytes


@dataclass
class RunConfig:
    profile: str = "laptop-cpu"
    model: str | None = None  # None: the built-in default (SmolLM2-135M-Instruct)
    settings: PruneSettings = field(default_factory=PruneSettings)
    plan: str | None = None  # apply this plan file instead of making one
    out: Path | None = None  # None: plan only, write nothing
    force: bool = False
    eval_text: str = HELDOUT
    eval_windows: int | None = 32  # None: all; 0: skip perplexity
    eval_seq_len: int = 512
    calib_batch_size: int = 1  # samples per forward: 1 keeps activation memory smallest, same speed
    threads: int | None = None
    alignment: int | None = None  # None: the target format decides (k-quants: 256)
    target: str | None = None  # None: the resized checkpoint only; "gguf" / "onnx": export, benchmark
    quant: str | None = None  # GGUF type; None: the profile's (gguf profiles), else F16
    dtype: str | None = None  # ONNX precision; None: the profile's (onnx profiles), else fp32
    search: bool = False  # choose the removal target from the budgets (settings.sparsity ignored)
    # With search: the types the search may choose among (joint.py), None: the one type of
    # --quant / --dtype / the profile (the search then varies structure only)
    types: tuple[str, ...] | None = None
    margin: float = 0.02  # the search keeps this fraction below (above) each budget
    check_neighbour: bool = False  # also build and measure the plan with 5% less pruning
    budgets: dict = field(default_factory=dict)  # overrides: max_memory, min_tokens_per_s, context, max_ttft
    recover: RecoverSettings | None = None  # distil the pruned model from the dense one (recover.py)
    resume: bool = False  # continue an interrupted recovery from its saved state
    device: str = "auto"  # where recovery trains: auto (CUDA when torch sees a GPU), cpu, cuda[:N]


def is_tool_output(folder: Path) -> bool:
    """A folder this tool wrote: a manifest.json of ours, or a sweep (sweep.csv and runs that
    have manifests)."""
    from .deploy import MANIFEST

    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if isinstance(manifest, dict) and "manifest_version" in manifest:
            return True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return (folder / "sweep.csv").is_file() and any(folder.glob(f"r*/{MANIFEST}"))


def check_replaceable(out: Path) -> None:
    """--force replaces only an output of this tool or an empty folder, and never the current
    folder or one above it."""
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"--force will not replace {out}: it holds the current folder")
    if any(out.iterdir()) and not is_tool_output(out):
        raise UserError(f"--force will not replace {out}: it is not an output folder of "
                        "mosaic-export (no manifest.json) and not empty")


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if out.exists():
        check_replaceable(out)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: folder {parent} is not writable")


def decoder_counts(loaded: LoadedModel) -> dict[str, int]:
    layers = loaded.spec.layer_list(loaded.model)
    params = [p for p in layers.parameters()]
    return {
        "decoder": sum(p.numel() for p in params),
        "decoder_nonzero": sum(int(torch.count_nonzero(p)) for p in params),
        "total": sum(p.numel() for p in loaded.model.parameters()),
    }


def prepare(config: RunConfig) -> tuple[Profile, PruneSettings, Plan | None, Format]:
    """Check every input that can be checked without the model; fail before any work.

    Returns the profile (budgets overridden), the settings, the plan to apply (if given) and the
    format the cost model prices: the target's (``--target``, else the profile's) with the GGUF
    type or the ONNX dtype (the option, else the profile's, else F16 / fp32)."""
    from .targets import channel_alignment, check_target

    profile = load_profile(config.profile).with_budgets(**config.budgets)
    runtime = profile.runtime
    target = config.target or runtime.target
    check_target(target)
    if config.alignment is not None and config.alignment < 1:
        raise UserError(f"--align must be a positive integer, got {config.alignment}")
    if config.threads is not None and config.threads < 1:
        raise UserError(f"--threads must be a positive integer, got {config.threads}")
    if config.eval_seq_len < 2:
        raise UserError(f"--eval-seq-len must be at least 2 tokens, got {config.eval_seq_len}")
    if target == "gguf":
        from .targets.gguf import check_type

        if config.dtype is not None:
            raise UserError("--dtype is for the ONNX target; GGUF takes --quant")
        fmt = check_type(config.quant or (runtime.quant if runtime.target == "gguf" else "F16"))
    else:
        from .targets.onnx import check_dtype

        if config.quant is not None:
            raise UserError("--quant is for the GGUF target; ONNX takes --dtype")
        fmt = check_dtype(config.dtype or (runtime.dtype if runtime.target == "onnx" else "fp32"))
    alignment = config.alignment or channel_alignment(target, fmt)
    settings = replace(config.settings, alignment=alignment).validate()
    if config.types:
        from .joint import TYPES

        bad = [t for t in config.types if t not in TYPES[target]]
        if bad:
            raise UserError(f"types {', '.join(bad)} are not offered by the {target} target "
                            f"({', '.join(TYPES[target])})")
        if config.plan:
            raise UserError("--plan applies a plan as it is; it cannot be combined with --types")
    plan = Plan.load(config.plan) if config.plan else None
    if plan is not None and config.search:
        raise UserError("--plan applies a plan as it is; it cannot be combined with a budget search")
    if plan is not None:
        settings = plan.settings
    if config.out is not None:
        check_output(config.out, config.force)
    if not 0 <= config.margin < 0.5:
        raise UserError(f"--margin must be in [0, 0.5), got {config.margin}")
    if config.eval_windows is not None and config.eval_windows < 0:
        raise UserError(f"evaluation windows must be >= 0, got {config.eval_windows}")
    recover_text = config.recover.sources if config.recover else []
    for source in (settings.calibration.source, config.eval_text, *recover_text):
        if source not in (BUILTIN, HELDOUT, SELF) and not Path(source).is_file():
            raise UserError(f"text file not found: {source}")
    if config.eval_text == SELF:
        raise UserError("--eval-text self: perplexity is measured on real text (builtin-heldout "
                        "or a file)")
    resolve_device(config.device)
    if config.model is not None and not Path(config.model).exists():
        raise UserError(f"model not found: {config.model}")
    return profile, settings, plan, Format(target, fmt)


def check_lengths(config: RunConfig, loaded: LoadedModel, settings: PruneSettings | None = None,
                  evaluate: bool = True) -> None:
    """The calibration (and, with ``evaluate``, perplexity) windows fit the model's positions."""
    longest = getattr(loaded.model.config, "max_position_embeddings", None)
    if not longest:
        return
    lengths = [("--calib-seq-len", (settings or config.settings).calibration.seq_len)]
    if evaluate and config.eval_windows != 0:
        lengths.append(("--eval-seq-len", config.eval_seq_len))
    for flag, n in lengths:
        if n > longest:
            raise UserError(f"{flag} {n} is longer than the model's maximum of {longest} tokens "
                            "(max_position_embeddings)")


def recovery_state_dir(out: Path) -> Path:
    """Where an interrupted recovery keeps its state: beside OUT, not inside its temporary
    folder (which an interruption removes)."""
    out = out.resolve()
    return out.parent / f".{out.name}.recover"


def recover_model(config: RunConfig, loaded: LoadedModel, log=print) -> dict:
    """Distil the pruned model in place from the dense one (loaded again as the teacher)."""
    from .recover import distill, training_windows

    settings = config.recover
    log(f"recovering: distilling from the dense model on {settings.windows} windows of "
        f"{settings.seq_len} tokens of {settings.text} ({settings.steps} steps)")
    teacher = load_model(config.model)
    t0 = time.perf_counter()
    ids, source = training_windows(settings, teacher, recovery_state_dir(config.out), log,
                                   config.device)
    text_s = time.perf_counter() - t0  # self text: the generation (or the cache read)
    result = distill(loaded.model, teacher.model, ids, settings, recovery_state_dir(config.out),
                     config.resume, device=config.device)
    del teacher
    release_memory()
    log(f"recovered in {result.seconds:.0f} s: distillation loss {result.first_loss:.3f} -> "
        f"{result.final_loss:.3f}")
    return {**result.to_dict(), "text": source, "text_seconds": text_s}


def resolve_budgets(profile: Profile, pricing: Pricing | None, log=None) -> Profile:
    """Relative budgets ("0.9x") as absolute ones: the factor times the dense model's predicted
    figure in the target's format on the profile."""
    relative = profile.budgets.relative
    if not relative:
        return profile
    if pricing is None:
        raise UserError("relative budgets (such as 0.9x) are relative to the dense model in a "
                        "runtime format: give a target (--target gguf or onnx)")
    dense = pricing.cost([pricing.shape.dense_dims] * pricing.shape.n_layers)
    resolved = profile.resolve_relative(dense.memory_bytes, dense.decode_tokens_per_s, dense.ttft_s)
    if log is not None:
        b = resolved.budgets
        absolute = {"max_memory": format_bytes(b.max_memory_bytes or 0),
                    "min_tokens_per_s": f"{b.min_tokens_per_s or 0:.1f} tokens/s",
                    "max_ttft": f"{(b.max_ttft_s or 0) * 1e3:.0f} ms"}
        log(f"budgets relative to the dense model ({pricing.fmt.key}, {dense.basis} prediction): "
            + "; ".join(f"{name} {factor:g}x = {absolute[name]}" for name, factor in relative.items()))
    return resolved


def output_bytes_needed(plan: Plan, pricing: Pricing | None, dense_total_params: int) -> int:
    """Disk the outputs take at their largest: the float32 checkpoint, the float32 file an export
    starts from and the runtime file (its exact weight bytes when priced), with 10% to spare."""
    params = plan.params()
    total = dense_total_params - (params["decoder_dense"] - params["decoder_resized"])
    runtime = 0
    if pricing is not None:
        runtime = 4 * total + pricing.cost([lp.dims for lp in plan.layers]).weight_bytes
    return int(1.1 * (4 * total + runtime)) + 16 * 2**20


def check_free_space(out: Path, plan: Plan, pricing: Pricing | None, dense_total_params: int) -> None:
    """Refuse before the long work when the disk cannot hold the outputs."""
    need = output_bytes_needed(plan, pricing, dense_total_params)
    parent = out.resolve().parent
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UserError(f"not enough free space for {out}: the outputs need about "
                        f"{format_bytes(need)}, {parent} has {format_bytes(free)} free")


def make_or_load_plan(config: RunConfig, loaded: LoadedModel, settings: PruneSettings,
                      plan: Plan | None, calib: torch.Tensor, profile: Profile | None = None,
                      pricing: Pricing | None = None, log=print
                      ) -> tuple[Plan, LayerStream, SearchResult | JointResult | None]:
    """The plan given, or one made from pass 1: at settings.sparsity, or, with config.search,
    at the least removal whose predicted cost meets the profile's budgets (with config.types, the
    joint search over types, structure and recovery: a JointResult)."""
    stream = LayerStream(loaded.model, loaded.spec, calib, config.calib_batch_size)
    if plan is not None:
        if plan.model["shape"] != loaded.shape.to_dict():
            raise UserError("the plan was made for a model of another shape: "
                            f"{plan.model['shape']} vs {loaded.shape.to_dict()}")
        return plan, stream, None
    start = stream.hidden
    measured = measure(stream, loaded.spec, loaded.shape, settings.outlier_m)
    stream.hidden = start  # pass 2 starts again from the embeddings of the calibration samples
    if not config.search:
        return make_plan(loaded.shape, loaded.source, measured, settings), stream, None
    if config.types:
        joint = joint_search(config, loaded, measured, settings, profile, calib, log)
        return joint.chosen.candidate.plan, stream, joint
    found = search(loaded.shape, loaded.source, measured, settings, profile.budgets, pricing,
                   config.margin)
    return found.chosen.plan, stream, found


def joint_search(config: RunConfig, loaded: LoadedModel, measured, settings: PruneSettings,
                 profile: Profile, calib: torch.Tensor, log=print) -> JointResult:
    """The joint search (joint.py): every type's budget search, the quality probe (quality.py:
    the dense model at each type in its runtime; pruned copies only where pruning could win),
    the choice."""
    from .costmodel import anchored
    from .joint import (
        LADDER,
        choose,
        competitive,
        dense_bar,
        infeasible_message,
        options,
        probe_levels,
        probe_stop,
        recovery_levels,
        type_searches,
    )
    from .quality import (
        PROBE_WINDOWS,
        QualityModel,
        measure_structure,
        measure_types,
        share_points,
        structure_points,
        write_probe,
    )
    from .targets import channel_alignment

    t0 = time.perf_counter()
    target = config.target
    pricings = {t: replace(make_pricing(profile, Format(target, t), loaded),
                           calibration=profile.calibration_near(Format(target, t)))
                for t in config.types}
    text = config.eval_text if config.eval_windows != 0 else HELDOUT
    context = next(iter(pricings.values())).context
    with tempfile.TemporaryDirectory(prefix="mosaic-probe-") as work:
        path, probe = write_probe(text, loaded.tokenizer, work)
        log(f"joint search over {', '.join(config.types)}: quality probe on {probe.shape[0]} windows "
            f"from the end of {text}")
        reference = perplexity(loaded.model, probe, text, desc="probe (dense)").perplexity
        dense_runs = measure_types(loaded, target, list(config.types), str(path), work, context,
                                   config.threads, log=log)
    type_deltas = {t: math.log(r["perplexity"]["perplexity"] / reference) for t, r in dense_runs.items()}
    dense_dims = [loaded.shape.dense_dims] * loaded.shape.n_layers
    for t, pricing in pricings.items():  # a type detect did not measure: anchored at its dense
        if profile.local and pricing.calibration.basis != "measured":  # run (this machine's only)
            pricings[t] = replace(pricing, calibration=anchored(pricing, dense_dims, dense_runs[t]))
    alignments = {t: config.alignment or channel_alignment(target, t) for t in config.types}
    searches = type_searches(loaded.shape, loaded.source, measured, settings, profile.budgets,
                             pricings, alignments, config.margin)
    if all(isinstance(s, str) for s in searches.values()):
        raise UserError(infeasible_message(searches))
    comp = competitive(searches, type_deltas)
    levels = probe_levels(list(comp.values()))
    structure, share, recovered = (), (), None
    if levels:
        recover_at = recovery_levels(levels, list(comp.values())) if config.recover else ()
        align = min(alignments[t] for t in comp)
        log(f"structural probe at {', '.join(f'{lv:.0%}' for lv in levels)} (alignment {align}; "
            "it stops once the levels measured rule out the types that need more)")
        stop = probe_stop(comp, type_deltas, dense_bar(searches, type_deltas), reference,
                          len(recover_at), log)
        probed = measure_structure(loaded, measured, replace(settings, alignment=align), levels,
                                   calib, probe, config.recover, recover_at,
                                   recovery_state_dir(config.out) if config.out else None,
                                   config.device, log, stop=stop)
        structure = structure_points(reference, [(r, p) for _, r, p in probed["levels"]])
        recovered = probed["recovered"]
        if recovered:
            share = share_points(reference, probed["levels"], recovered)
    else:
        log("structural probe skipped: no type that needs pruning (up to "
            f"{LADDER[-1]:.0%}) to meet the budgets can beat the best dense type that meets them")
    quality = QualityModel(reference, type_deltas, structure, share, probe={
        "text": text, "windows": PROBE_WINDOWS, "from": "the end of the text", "dense_runs": {
            t: {"perplexity": r["perplexity"]["perplexity"], "file_bytes": r["file_bytes"],
                "peak_rss_bytes": r["peak_rss_bytes"], "decode_tokens_per_s": r["decode"]["tokens_per_s"],
                "prefill_tokens_per_s": r["prefill"]["tokens_per_s"]} for t, r in dense_runs.items()},
        "structure_alignment": min((alignments[t] for t in comp), default=None),
        "structure_levels_planned": levels,
        "recovered": [list(r) for r in recovered] if recovered else None})
    opts = options(searches, quality, config.recover is not None)
    chosen, why = choose(opts, quality)
    log(f"joint search: {chosen.label()}: {why}")
    return JointResult(chosen, opts, searches, quality, why, pricings, time.perf_counter() - t0)


def make_pricing(profile: Profile, fmt: Format, loaded: LoadedModel, strict: bool = True) -> Pricing:
    """The cost model for this model in the format on the profile's device (GGUF: the types
    llama.cpp's quantizer will choose, read from a stand-in file). A budget context longer than
    the model's is an error when budgets drive the run (``strict``), else priced at the model's."""
    from .targets import exporter

    exporter(fmt.target).check_exportable(loaded)
    context = profile.budgets.context
    longest = getattr(loaded.model.config, "max_position_embeddings", None) or context
    if context > longest and strict:
        raise UserError(f"a context of {context} tokens is longer than the model's maximum of "
                        f"{longest}")
    types = None
    if fmt.target == "gguf":
        from .targets.gguf import intended_types

        types = intended_types(loaded, fmt.name)
    return Pricing(loaded.shape, fmt, profile.calibration_for(fmt), min(context, longest), types)


def calibration_ids(loaded: LoadedModel, settings: PruneSettings, cache_dir: Path | None = None,
                    device: str | None = "cpu") -> torch.Tensor:
    """The calibration windows: sampled from the text source, or (``self``) the model's own text,
    generated before any pruning (cached in ``cache_dir``)."""
    c = settings.calibration
    if c.source == SELF:
        from .self_text import self_text

        ids = self_text(loaded, c.n_samples * c.seq_len, c.seed, cache_dir, device=device)
        return ids.view(c.n_samples, c.seq_len)
    return sample_windows(tokenize(loaded.tokenizer, corpus(c.source)), c.n_samples, c.seq_len,
                          c.seed, source=c.source)


def run_plan(config: RunConfig) -> tuple[Plan, SearchResult | None]:
    """Dry run: the plan (searched for when config.search) and its parameter counts; prunes
    nothing."""
    profile, settings, plan, fmt = prepare(config)
    loaded = load_model(config.model)
    check_lengths(config, loaded, settings, evaluate=False)
    pricing = make_pricing(profile, fmt, loaded) if config.search or profile.budgets.relative else None
    profile = resolve_budgets(profile, pricing)
    plan, _, found = make_or_load_plan(config, loaded, settings, plan,
                                       calibration_ids(loaded, settings), profile, pricing)
    return plan, found


def run(config: RunConfig, log=print) -> dict:
    """Prune, save, reload-check and evaluate; returns the report (also written to OUT)."""
    if config.out is None:
        raise UserError("an output folder is needed (--out)")
    profile, settings, plan, fmt = prepare(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    log(f"profile {profile.name}: {profile.description}")
    t0 = time.perf_counter()
    loaded = load_model(config.model)
    load_s = time.perf_counter() - t0
    check_lengths(config, loaded, settings)
    log(f"model {loaded.source}: {loaded.shape.model_type}, {loaded.shape.n_layers} layers "
        f"(loaded in {load_s:.1f} s)")
    pricing = None
    if config.target is not None or config.search:  # before any pruning: can it be exported?
        pricing = make_pricing(profile, fmt, loaded,
                               strict=config.search or "context" in config.budgets)
    profile = resolve_budgets(profile, pricing, log)
    dense_counts = decoder_counts(loaded)
    dense_fp32 = 4 * dense_counts["total"]

    eval_ids = None
    if config.eval_windows != 0:
        eval_ids = windows(tokenize(loaded.tokenizer, corpus(config.eval_text)),
                           config.eval_seq_len, config.eval_windows, config.eval_text)
    calib = calibration_ids(loaded, settings, recovery_state_dir(config.out), config.device)
    ppl_dense = perplexity(loaded.model, eval_ids, config.eval_text,
                           desc="perplexity (dense)") if eval_ids is not None else None

    t0 = time.perf_counter()
    plan, stream, found = make_or_load_plan(config, loaded, settings, plan, calib, profile, pricing,
                                            log)
    joint = None
    if isinstance(found, JointResult):  # the type is the search's choice
        joint, found = found, found.search
        fmt, pricing = Format(fmt.target, joint.chosen.type), joint.pricings[joint.chosen.type]
        settings = plan.settings
    if found is not None:
        log(search_summary(found))
    check_free_space(config.out, plan, pricing, dense_counts["total"])
    apply_plan(stream, loaded.spec, plan)
    del stream
    loaded.layer_dims = [lp.dims for lp in plan.layers]
    joint_s = joint.seconds if joint is not None else 0.0
    prune_s = time.perf_counter() - t0 - joint_s  # the joint search is timed on its own
    peak_after_prune = peak_rss_bytes()

    pruned_counts = decoder_counts(loaded)
    expected = plan.params()
    if pruned_counts["decoder"] != expected["decoder_resized"]:
        raise RuntimeError(f"resized model has {pruned_counts['decoder']} decoder parameters, "
                           f"the plan says {expected['decoder_resized']}")
    ppl_pruned = perplexity(loaded.model, eval_ids, config.eval_text,
                            desc="perplexity (pruned)") if eval_ids is not None else None
    recovery, ppl_before = None, None
    if config.recover is not None and joint is not None and not joint.chosen.recovered:
        log("recovery skipped: the joint search chose a model without pruning")
    elif config.recover is not None:
        recovery = recover_model(config, loaded, log)
        ppl_before = ppl_pruned
        ppl_pruned = perplexity(loaded.model, eval_ids, config.eval_text,
                                desc="perplexity (recovered)") if eval_ids is not None else None

    report = {
        "tool": {"name": "mosaic-export", "version": __version__},
        "profile": profile.to_dict(),
        "model": {"source": loaded.source, "shape": loaded.shape.to_dict()},
        "format": {"target": fmt.target, "type": fmt.name} if config.target else None,
        "settings": asdict(settings),
        "params": {"dense": dense_counts, "pruned": pruned_counts, "planned": expected},
        "timing": {"load_s": load_s, "prune_s": prune_s, **({"joint_s": joint_s} if joint else {})},
        # peak_rss_bytes is replaced by the whole run's (recovery, export, checks) at its end
        "memory": {"peak_rss_bytes": peak_after_prune, "peak_rss_after_prune_bytes": peak_after_prune,
                   "dense_fp32_bytes": dense_fp32,
                   "pruned_fp32_bytes": 4 * pruned_counts["total"],
                   "peak_rss_over_fp32_model": peak_after_prune / dense_fp32},
        "budgets": dataclasses.asdict(profile.budgets),
        "layers": [lp.dims.__dict__ for lp in plan.layers],
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    if ppl_dense is not None:
        report["perplexity"] = {"dense": ppl_dense.to_dict(), "pruned": ppl_pruned.to_dict(),
                                "protocol": "non-overlapping windows from the start of the text, "
                                            "each scored alone; see mosaic_export/evaluate.py"}
        if ppl_before is not None:
            report["perplexity"]["before_recovery"] = ppl_before.to_dict()
    if recovery is not None:
        report["recovery"] = recovery
    if joint is not None:
        report["joint"] = joint.to_dict()
    def build(folder: Path) -> None:
        save_checkpoint(loaded, folder / "model")
        report["reload"] = reload_check(loaded, folder / "model", calib[:1, :128])
        evaluation = dict(eval_text=config.eval_text, eval_windows=config.eval_windows,
                          eval_seq_len=config.eval_seq_len, threads=config.threads)
        if config.target == "gguf":
            from .targets.gguf import deploy

            log(f"exporting GGUF {fmt.name} and running it in llama.cpp")
            report["gguf"] = deploy(loaded, folder / f"model-{fmt.name}.gguf", fmt.name,
                                    parity_ids=calib[0], context=pricing.context, **evaluation)
        elif config.target == "onnx":
            from .targets.onnx import deploy as deploy_onnx
            from .targets.onnx_runner import available_provider

            wanted = profile.runtime.execution_provider
            if wanted and available_provider(wanted) != wanted:
                log(f"ONNX Runtime here has no {wanted} (profile {profile.name}); benchmarking "
                    f"on {available_provider(wanted)}")
            log(f"exporting ONNX {fmt.name} and running it in ONNX Runtime")
            report["onnx"] = deploy_onnx(loaded, folder / f"onnx-{fmt.name}", fmt.name,
                                         parity_ids=calib[0], provider=wanted,
                                         context=pricing.context, **evaluation)
        if pricing is not None:
            report["cost"] = cost_section(profile, pricing, plan, found,
                                          report.get(fmt.target, {}).get("benchmark"), config.margin)
            if config.check_neighbour and found is not None and found.neighbour is not None:
                log(f"measuring the plan with 5% less pruning ({found.neighbour.target:.0%})")
                report["cost"]["neighbour_measured"] = measure_neighbour(
                    config, profile, pricing, found.neighbour.plan, folder)
        if joint is not None:
            report["joint"]["measured"] = joint_check(joint, report, fmt.target)
        report["memory"]["peak_rss_bytes"] = peak_rss_bytes()
        plan.save(folder / "plan.json")
        pod_heatmap(plan, folder / "pod.png")
        if "cost" in report:
            cost_plot(report["cost"], folder / "cost.png")
        if "recovery" in report:
            recovery_plot(report["recovery"], folder / "recovery.png")
        if "joint" in report:
            front_plot(report["joint"], folder / "front.png")
        write_markdown(report, folder)
        (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        finalize(folder, report, calib[0].tolist())  # README.md, then manifest.json over all

    write_outputs(config.out, config.force, build, log)
    log(summary_table(report))
    if "cost" in report:
        log(budget_table(report["cost"]))
        n = report["cost"].get("neighbour_measured")
        if n:
            log(f"with 5% less pruning ({n['removed']:.1%} removed), measured here: "
                + "; ".join(f"{b['text']}: {'met' if b['met'] else 'MISSED'}" for b in n["budgets"]))
    log(f"wrote {config.out}/ ({', '.join(sorted(p.name for p in config.out.iterdir()))})")
    return report


def joint_check(joint: JointResult, report: dict, target: str) -> dict | None:
    """The chosen candidate's predicted perplexity on the evaluation text (the dense float32
    figure there, moved by the predicted change) against the runtime's measured one."""
    measured = report.get(target, {}).get("benchmark", {}).get("perplexity")
    dense = report.get("perplexity", {}).get("dense")
    if not measured or not dense or joint.chosen.delta is None:
        return None
    from .quality import log_error

    predicted = dense["perplexity"] * math.exp(joint.chosen.delta)
    return {"text": measured["text"], "predicted_perplexity": predicted,
            "measured_perplexity": measured["perplexity"],
            "log_error": log_error(predicted, measured["perplexity"])}


def measure_neighbour(config: RunConfig, profile: Profile, pricing: Pricing, plan: Plan,
                      work: Path) -> dict:
    """The dense model cut to the plan's structure (sizes are what cost), exported and run in the
    runtime like the chosen plan; its measured figures against the budgets."""
    from .detect import run_format
    from .prune.apply import resize_to_plan

    loaded = load_model(config.model)
    resize_to_plan(loaded, plan)
    with tempfile.TemporaryDirectory(prefix=".neighbour-", dir=work) as tmp:  # removed with work
        bench = run_format(loaded, pricing.fmt, Path(tmp), pricing.context, config.threads)
    del loaded
    figures, checks = measured_figures(bench, profile.budgets)
    return {"removed": plan.removed(), **figures,
            "budgets": [c.__dict__ | {"text": c.describe()} for c in checks]}


def measured_figures(bench: dict, budgets) -> tuple[dict, list]:
    """A runtime benchmark's figures (TTFT: the prefill plus one decode step) and each budget
    against them."""
    decode = bench["decode"]["tokens_per_s"]
    ttft = bench["prefill"]["seconds"] + 1 / decode
    figures = {"memory_bytes": bench["peak_rss_bytes"], "decode_tokens_per_s": decode,
               "prefill_tokens_per_s": bench["prefill"]["tokens_per_s"], "ttft_s": ttft,
               "context": bench["context"]}
    return figures, check_budgets(budgets, bench["peak_rss_bytes"], decode, ttft)


def search_summary(found: SearchResult) -> str:
    c = found.chosen
    if c.target == 0:
        return (f"the dense model already meets every budget (predicted: "
                f"{'; '.join(b.describe() for b in c.checks)}): no pruning")
    n = found.neighbour
    missed = [b.describe() for b in n.checks if not b.met] if n else []
    return (f"budget search ({len(found.priced)} plans priced): {c.target:.0%} of the decoder removed "
            f"by structure is the least that meets every budget (predicted: "
            f"{'; '.join(b.describe() for b in c.checks)})"
            + (f"; at {n.target:.0%} it would miss: {'; '.join(missed)}" if n else ""))


def cost_section(profile: Profile, pricing: Pricing, plan: Plan, found: SearchResult | None,
                 bench: dict | None, margin: float = 0.0) -> dict:
    """Predicted and (on this machine) measured figures, each budget against them."""
    cost = pricing.cost([lp.dims for lp in plan.layers])
    b = profile.budgets
    section = {"format": pricing.fmt.key, "basis": cost.basis, "profile_local": profile.local,
               "removed": plan.removed(),
               "calibration": pricing.calibration.to_dict(), "predicted": cost.to_dict(),
               "predicted_budgets": [c.__dict__ for c in cost_checks(b, cost)],
               "search": found.to_dict() if found else None, "margin": margin}
    if bench is not None:
        section["measured"], checks = measured_figures(bench, b)
        section["measured_budgets"] = [c.__dict__ for c in checks]
    return section


TMP_INFIX = ".tmp-"  # OUT is built in .OUT.tmp-PID-XXXX beside it


def stale_temporaries(out: Path) -> tuple[list[Path], list[Path]]:
    """Temporary folders an earlier run left beside OUT: (those whose process is gone, those
    whose process may still run). The folder name carries the process id."""
    gone, unknown = [], []
    for path in sorted(out.parent.glob(f".{out.name}{TMP_INFIX}*")):
        pid_text = path.name[len(f".{out.name}{TMP_INFIX}"):].split("-")[0]
        if not pid_text.isdigit():  # written before names carried the process id
            unknown.append(path)
        elif not _alive(int(pid_text)):
            gone.append(path)
    return gone, unknown


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path, log=print) -> None:
    """Remove what a killed earlier run left beside OUT; name what may belong to a live run."""
    gone, unknown = stale_temporaries(out)
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path.name}, left by an earlier run that was killed")
    for path in unknown:
        log(f"mosaic-export: warning: {path} was left by an earlier run (it may still be running); "
            "delete it if not")


def write_outputs(out: Path, force: bool, build: Callable[[Path], None], log=print) -> None:
    """Let build() write everything into a temporary folder beside OUT, then move it into place.

    On any failure (a signal included: the CLI turns SIGTERM and SIGHUP into an exception) the
    temporary folder is removed: OUT is either complete or untouched. Temporary folders of
    earlier runs that were killed outright (SIGKILL, power) are removed first."""
    out = out.resolve()
    clean_stale(out, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}{os.getpid()}-", dir=out.parent))
    try:
        build(tmp)
        mask = os.umask(0)
        os.umask(mask)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers use 0600
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        if out.exists():
            if not force:
                raise UserError(f"output folder {out} appeared while working; not replacing it")
            check_replaceable(out)
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, UserError | KeyboardInterrupt) and disk_full(out.parent, e):
            raise UserError(f"cannot write {out}: no space left on the device "
                            f"({format_bytes(shutil.disk_usage(out.parent).free)} free)") from None
        raise


def disk_full(folder: Path, error: BaseException) -> bool:
    """Did error come from a full disk? (Libraries wrap ENOSPC in their own exception types.)"""
    return "No space left" in str(error) or shutil.disk_usage(folder).free < 2**20


@torch.no_grad()
def reload_check(loaded: LoadedModel, folder: Path, ids: torch.Tensor) -> dict:
    """Reload the saved checkpoint and compare its logits with the in-memory model's on ids."""
    from .model_io import load_resized

    again = load_resized(folder)
    diff = (again.model(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max()
    del again
    result = {"max_abs_logit_diff": float(diff), "tokens": int(ids.numel())}
    if not diff < 1e-4:
        raise RuntimeError(f"reloaded checkpoint differs from the pruned model: {result}")
    return result


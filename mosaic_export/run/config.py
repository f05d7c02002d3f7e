"""What a run is asked to do (RunConfig) and the door every input passes: prepare checks the
profile, the budgets, the target and its type, the plan, the texts, the model path and OUT before
any work, and returns them resolved (Inputs)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from mosaic_export import targets
from mosaic_export.bundle.outputs import check_output
from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import BUILTIN, HELDOUT, SELF
from mosaic_export.decide.costmodel import Format
from mosaic_export.decide.profile import Profile, load_profile
from mosaic_export.measure import rounds as measure_rounds
from mosaic_export.measure.rounds import Policy
from mosaic_export.method.plan import Plan, PruneSettings
from mosaic_export.method.recover import RecoverSettings
from mosaic_export.model.device import resolve_device
from mosaic_export.model.folder import LoadedModel, is_resized_checkpoint


@dataclass(frozen=True)
class RunConfig:
    """One run, resolved once from the command line (cli._config) or built in Python."""

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
    kv_heads: str | None = None  # "keep" / "prune"; None: the target decides (ONNX keeps them for GenAI)
    target: str | None = None  # a registered target (export, benchmark); None: the resized checkpoint only
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
    # A Ray cluster ("auto" or an address) for a sweep's runs and the joint search's dense runs of
    # each type (cluster.py); each task's CPUs (None: threads, else 1) and its retries (None: 2)
    ray: str | None = None
    ray_cpus: int | None = None
    retries: int | None = None
    # Models bigger than memory: the decoder layers read from disk one at a time (weights.py),
    # and the most resident memory the run may take (checked against memory.run_needs)
    stream: bool = False
    max_rss: int | None = None  # the whole process tree's: this process and its runtime children
    # How speed and memory are measured: interleaved rounds, their time cap and precision (None:
    # measure.rounds.VERDICT_POLICY)
    policy: Policy | None = None

    @property
    def rounds(self) -> Policy:
        """The rounds policy of this run's measurements."""
        return self.policy or measure_rounds.VERDICT_POLICY


@dataclass(frozen=True)
class Inputs:
    """Everything the user handed in, checked before any work (prepare)."""

    profile: Profile  # budgets overridden from the command line
    settings: PruneSettings  # alignment resolved; a given plan's own settings
    plan: Plan | None  # the plan to apply, if one was given
    fmt: Format  # the format the cost model prices and the run exports


def prepare(config: RunConfig) -> Inputs:
    """Check every input that can be checked without the model; fail before any work.

    Returns the profile (budgets overridden), the settings, the plan to apply (if given) and the
    format the cost model prices: the target's (``--target``, else the profile's) with the GGUF
    type or the ONNX dtype (the option, else the profile's, else F16 / fp32)."""
    profile = load_profile(config.profile).with_budgets(**config.budgets)
    target = targets.get(config.target or profile.runtime.target)
    _check_positive(config)
    fmt = Format(target.name, _type(config, target, profile.runtime))
    keep_kv = config.kv_heads == "keep" if config.kv_heads else target.keeps_kv_heads(fmt.name)
    settings = replace(config.settings, alignment=config.alignment or target.alignment(fmt.name),
                       keep_kv_heads=keep_kv).validate()
    plan = _plan(config, target)
    if plan is not None:
        settings = plan.settings
    if config.out is not None:
        check_output(config.out, config.force)
    if not 0 <= config.margin < 0.5:
        raise UserError(f"--margin must be in [0, 0.5), got {config.margin}")
    if config.eval_windows is not None and config.eval_windows < 0:
        raise UserError(f"evaluation windows must be >= 0, got {config.eval_windows}")
    _check_texts(config, settings)
    _check_stream(config, target, fmt.name)
    resolve_device(config.device)
    if config.model is not None and not Path(config.model).exists():
        raise UserError(f"model not found: {config.model}")
    if config.model is not None and is_resized_checkpoint(Path(config.model)):
        raise UserError(f"{config.model} is a resized checkpoint written by mosaic-export: its plan "
                        "was made for its source model; prune the source again (a new plan) instead")
    return Inputs(profile, settings, plan, fmt)


def _check_positive(config: RunConfig) -> None:
    if config.alignment is not None and config.alignment < 1:
        raise UserError(f"--align must be a positive integer, got {config.alignment}")
    if config.threads is not None and config.threads < 1:
        raise UserError(f"--threads must be a positive integer, got {config.threads}")
    if config.eval_seq_len < 2:
        raise UserError(f"--eval-seq-len must be at least 2 tokens, got {config.eval_seq_len}")
    if config.ray is None and (config.retries is not None or config.ray_cpus is not None):
        raise UserError(f"{'--retries' if config.retries is not None else '--ray-cpus'} is for work "
                        "on a Ray cluster (--ray)")
    if config.retries is not None and config.retries < 0:
        raise UserError(f"--retries must be >= 0, got {config.retries}")
    if config.ray_cpus is not None and config.ray_cpus < 1:
        raise UserError(f"--ray-cpus must be a positive integer, got {config.ray_cpus}")


def _check_stream(config: RunConfig, target, type_: str) -> None:
    """What a streamed run does not do yet, refused by name."""
    if config.max_rss is not None and not config.stream:
        raise UserError("--max-rss needs a streamed run (--stream)")
    if not config.stream:
        return
    streamed = [f"{t.name} ({', '.join(t.streamed_types())})" for t in targets.registered() if t.streams]
    unsupported = [flag for flag, used in (
        (f"--target {target.name} --{target.option} {type_} (a streamed run writes the checkpoint "
         f"alone, --target none, or {'; '.join(streamed)})",
         config.target is not None and type_ not in target.streamed_types()),
        ("a budget search (give --sparsity)", config.search), ("--plan", config.plan),
        ("--recover", config.recover), ("--check-neighbour", config.check_neighbour),
        ("--ray", config.ray), ("--calib-text self (the dense model generating its own text)",
                                config.settings.calibration.source == SELF)) if used]
    if unsupported:
        raise UserError(f"--stream does not work with {unsupported[0]} yet")
    if config.max_rss is not None and config.max_rss <= 0:
        raise UserError(f"--max-rss must be positive, got {config.max_rss} bytes")


def check_types(target, types) -> None:
    """--types: each one a type the target's search offers (the main command and the sweep)."""
    bad = [t for t in types if t not in target.search_types]
    if bad:
        raise UserError(f"--types: {', '.join(bad)} not offered by the {target.name} target "
                        f"({', '.join(target.search_types)})")


def _plan(config: RunConfig, target) -> Plan | None:
    """The plan file to apply (checked), which excludes a search and --types."""
    if config.types:
        if not target.scores_perplexity:
            raise UserError(f"the {target.name} target's benchmark scores no perplexity, which a "
                            f"search over types needs: fix the type with --{target.option}")
        check_types(target, config.types)
        if config.plan:
            raise UserError("--plan applies a plan as it is; it cannot be combined with --types")
    plan = Plan.load(config.plan) if config.plan else None
    if plan is not None and config.search:
        raise UserError("--plan applies a plan as it is; it cannot be combined with a budget search")
    return plan


def _check_texts(config: RunConfig, settings: PruneSettings) -> None:
    """Calibration, evaluation and recovery texts exist; perplexity is on real text."""
    recover_text = config.recover.sources if config.recover else []
    for source in (settings.calibration.source, config.eval_text, *recover_text):
        if source not in (BUILTIN, HELDOUT, SELF) and not Path(source).is_file():
            raise UserError(f"text file not found: {source}")
    if config.eval_text == SELF:
        raise UserError("--eval-text self: perplexity is measured on real text (builtin-heldout "
                        "or a file)")


def _type(config: RunConfig, target, runtime) -> str:
    """The format's type: the target's option (--quant / --dtype), else the profile's when its
    runtime is this target, else the target's default; the other option is an error."""

    given = {"quant": config.quant, "dtype": config.dtype}
    for option, value in given.items():
        if value is not None and option != target.option:
            owners = " or ".join(t.name for t in targets.registered() if t.option == option)
            raise UserError(f"--{option} is for the {owners} target; the {target.name} target takes "
                            f"--{target.option}")
    own = runtime.format.name if runtime.target == target.name else None
    return target.check_type(given[target.option] or own or target.default_type)


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

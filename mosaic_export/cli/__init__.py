"""The mosaic-export command line: a thin layer over mosaic_export.run. The main command (no
subcommand) is the main job; the subcommands, each with its line in the main --help, are listed
once, in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace

from mosaic_export.bundle.report import plan_table
from mosaic_export.cli import commands
from mosaic_export.cli.arguments import build_parser, fraction, measurement_policy
from mosaic_export.core.errors import UserError
from mosaic_export.core.units import parse_bytes
from mosaic_export.decide.profile import load_profile
from mosaic_export.decide.search import search_summary
from mosaic_export.decide.verdict import outcome
from mosaic_export.measure import rounds
from mosaic_export.method.plan import CalibrationSettings, PruneSettings
from mosaic_export.method.recover import RecoverSettings
from mosaic_export.run import cluster, replay
from mosaic_export.run.config import check_types, prepare
from mosaic_export.run.pipeline import RunConfig, run, run_plan
from mosaic_export.run.sweep import sweep
from mosaic_export.targets import get, names


def _config(args: argparse.Namespace):
    """The RunConfig the arguments ask for, made once (frozen); the profile is read only to name
    the target when --target is not given."""

    search = args.sparsity is None and args.plan is None
    budgets = {k: getattr(args, k) for k in ("max_memory", "min_tokens_per_s", "context", "max_ttft")
               if getattr(args, k) is not None}
    fields = dict(profile=args.profile, model=args.model, settings=_settings(args, search),
                  plan=args.plan, threads=args.threads, alignment=args.align, kv_heads=args.kv_heads,
                  search=search,
                  budgets=budgets, margin=args.margin)
    if hasattr(args, "out"):  # the main command and sweep; not plan
        target = _target(args, search)
        fields.update(out=args.out, force=args.force, eval_text=args.eval_text,
                      eval_seq_len=args.eval_seq_len,
                      eval_windows=None if args.eval_windows == -1 else args.eval_windows,
                      target=target, quant=args.quant, dtype=args.dtype,
                      check_neighbour=args.check_neighbour, recover=_recover(args),
                      resume=args.resume, device=args.device, types=_types(args, search, target),
                      ray=args.ray, ray_cpus=args.ray_cpus, retries=args.retries,
                      stream=args.stream or args.max_rss is not None,
                      max_rss=parse_bytes(args.max_rss) if args.max_rss is not None else None,
                      policy=measurement_policy(args, rounds.VERDICT_POLICY))
    return RunConfig(**fields)


def _settings(args: argparse.Namespace, search: bool) -> PruneSettings:
    d = PruneSettings()
    return PruneSettings(
        sparsity=0.0 if search else (args.sparsity if args.sparsity is not None else d.sparsity),
        structured_fraction=args.structured_fraction,
        allocation=args.allocation, method=args.method, outlier_m=args.outlier_m, lam=args.lam,
        compensate=not args.no_compensate, structured_scores=args.structured_scores,
        structure=args.structure,
        calibration=CalibrationSettings(args.calib_text, args.calib_samples, args.calib_seq_len, args.seed,
                                        args.calib_states))


def _recover(args: argparse.Namespace) -> RecoverSettings | None:
    if args.resume and not args.recover:
        raise UserError("--resume continues a recovery: give --recover too")
    if not args.recover:
        return None
    return RecoverSettings(tokens=args.recover_tokens, seq_len=args.recover_seq_len,
                           batch=args.recover_batch, lr=args.recover_lr,
                           temperature=args.recover_temperature,
                           hidden_weight=args.recover_hidden_weight, text=args.recover_text,
                           seed=args.seed).validate()


def _target(args: argparse.Namespace, search: bool) -> str | None:
    """--target, else the profile's runtime; "none" (no runtime file) as None."""
    if args.target is None:
        return load_profile(args.profile).runtime.target
    if args.target == "none" and search:
        raise UserError("--target none writes no runtime file, so there is nothing to "
                        "fit to the budgets: give --sparsity, or a target")
    return None if args.target == "none" else args.target


def _types(args: argparse.Namespace, search: bool, target: str | None) -> tuple[str, ...] | None:
    """The types to search (or sweep): --types, checked against the target; by default every
    type the target offers when a search runs and neither --quant nor --dtype fixes one."""

    fixed = args.quant or args.dtype
    if args.types is None:
        return get(target).search_types if search and target and not fixed and args.plan is None else None
    if target is None:
        raise UserError(f"--types needs a target format (--target {' or '.join(names())})")
    if fixed:
        raise UserError(f"--types and {'--quant' if args.quant else '--dtype'} both choose the type: "
                        "give one")
    if not search and not getattr(args, "targets", None):
        raise UserError("--types is for a budget search (no --sparsity) or a sweep")
    check_types(get(target), args.types)
    return tuple(dict.fromkeys(args.types))


def cmd_plan(argv: list[str]) -> int:
    p = build_parser("mosaic-export plan", plan_only=True)
    p.description = ("Dry run: the plan, made at --sparsity or by the budget search at the "
                     "profile's GGUF type or ONNX dtype, with its predicted cost; nothing is pruned "
                     "or exported. The joint search over types scores the model in the runtime, so "
                     "only the main command runs it.")
    args = p.parse_args(argv)
    plan, found = run_plan(_config(args))
    print(plan_table(plan))
    if found is not None:
        print(search_summary(found))
    if args.write_plan:
        try:
            plan.save(args.write_plan)
        except OSError as e:
            raise UserError(f"cannot write {args.write_plan}: {e}") from None
        print(f"wrote {args.write_plan}")
    return 0


def cmd_sweep(argv: list[str]) -> int:
    p = build_parser("mosaic-export sweep")
    p.description = ("The main job at several removal targets (all structured) for one target "
                     "format: OUT/r<target>/ per run, OUT/sweep.csv, OUT/pareto.png (perplexity "
                     "vs peak memory and vs decode tokens/s, Pareto fronts), OUT/report.md and "
                     "OUT/sweep.json (where each run was measured, after how many attempts).")
    p.add_argument("--targets", nargs="+", type=fraction, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                   help="shares of the decoder to remove (default: %(default)s)")
    p.epilog = ("The runs are built in .OUT.sweep/ beside OUT; if the sweep stops, the same command "
                "resumes it from the runs that finished. With --ray each run is a Ray task.")
    args = p.parse_args(argv)
    if args.config is not None:
        config, extra = _replayed(p, args, sweep=True)
        sweep(config, extra["targets"])
        return 0
    if args.sparsity is not None:
        raise UserError("a sweep sets the sparsity itself: use --targets instead of --sparsity")
    if args.stream or args.max_rss is not None:
        raise UserError("a sweep does not stream yet: drop --stream / --max-rss")
    args.sparsity = 0.0
    sweep(_config(args), args.targets)
    return 0


def _replayed(p: argparse.ArgumentParser, args: argparse.Namespace, sweep: bool) -> tuple[RunConfig, dict]:
    """The run --config names (its OUT/run.toml), with --out and --force from the command line;
    any other option beside it is refused (the file holds them all)."""
    defaults = vars(p.parse_args([]))
    given = sorted(k for k, v in vars(args).items()
                   if k not in ("config", "out", "force") and v != defaults[k])
    if given:
        raise UserError("--config runs what the file holds: give only --out and --force beside it, not "
                        + ", ".join("--" + k.replace("_", "-") for k in given))
    config, extra = replay.load(args.config)
    if (extra is not None) != sweep:
        command = "mosaic-export sweep" if extra is not None else "mosaic-export"
        raise UserError(f"--config {args.config}: this is a {'sweep' if extra else 'main-command run'}'s "
                        f"file: run it with {command} --config")
    out = args.out if args.out != defaults["out"] else config.out
    return replace(config, out=out, force=args.force), extra


def cmd_main(argv: list[str]) -> int:
    p = build_parser()
    p.epilog += "\n" + commands_help()
    args = p.parse_args(argv)
    config = _replayed(p, args, sweep=False)[0] if args.config is not None else _config(args)
    if config.ray and not config.types:
        raise UserError("--ray is for a sweep (mosaic-export sweep) or a joint search over types "
                        "(the main command without --sparsity, --quant or --dtype)")
    if config.ray:
        prepare(replace(config, out=None))  # the inputs, then the cluster, before any work
    with cluster.joined(config):
        report = run(config)
    return verdict_exit(report)


def verdict_exit(report: dict) -> int:
    """The exit status of the main command: verdict.MISSED_EXIT when a budget measured on this
    machine (a local profile) was missed beyond its interval, else 0; the last line names the
    budgets missed, or undecided."""

    cost = report.get("cost") or {}
    if not cost.get("profile_local") or "measured" not in cost:
        return 0
    code, line = outcome(cost["measured"]["verdicts"])
    if line:
        print(f"mosaic-export: {line}", file=sys.stderr if code else sys.stdout)
    return code


def _quiet_libraries() -> None:
    """transformers warns about its tokenizer conversion on every GGUF load; the CLI shows errors only."""
    from transformers.utils import logging

    logging.set_verbosity_error()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process is, so that it unwinds like Ctrl-C: temporary
    folders removed, child processes (runtime benchmarks) killed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _dispatch(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# name -> (what it runs on the rest of the command line, its usage and summary in the main --help)
SUBCOMMANDS = {
    "plan": (cmd_plan, "plan [options]", "dry run: the plan, with --write-plan written"),
    "sweep": (cmd_sweep, "sweep --targets S ... [options]", "the main job at several removals: fronts"),
    "profiles": (lambda rest: commands.cmd_profiles(), "profiles", "list the built-in hardware profiles"),
    "profile": (commands.cmd_profile, "profile detect --out F.toml", "measure this machine, write a profile"),
    "run": (commands.cmd_generate, "run OUT --prompt TEXT", "generate with OUT's runtime"),
    "verify": (commands.cmd_verify, "verify OUT", "checksums and parity of OUT against its manifest"),
    "bench": (commands.cmd_bench, "bench MODEL", "benchmark a GGUF file or an ONNX folder in rounds"),
}


def commands_help() -> str:
    """The subcommands as the main --help lists them, after its examples."""
    return "commands (mosaic-export COMMAND --help for each):\n" + "".join(
        f"  mosaic-export {usage:<32} {summary}\n" for _, usage, summary in SUBCOMMANDS.values())


def _dispatch(argv: list[str]) -> int:
    try:
        if argv[:1] and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]][0](argv[1:])
        return cmd_main(argv)
    except UserError as e:
        print(f"mosaic-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"mosaic-export: terminated ({signal.Signals(e.signum).name}); nothing was written",
              file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("mosaic-export: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

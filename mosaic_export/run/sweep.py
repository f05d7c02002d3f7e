"""`mosaic-export sweep`: the main job at several removal targets (and, with --types, at several
storage types); the Pareto front of quality against memory and against speed.

Each (type, target) is a full run (structured pruning at that share of the decoder, export,
benchmark, perplexity) written to OUT/r{target}/ (OUT/{type}-r{target}/ with --types);
OUT/sweep.csv holds one row per run, OUT/pareto.png the two fronts, OUT/report.md both and
OUT/sweep.json where each run was measured and after how many attempts.

The dense pass (pass 1 over the dense model, the dense perplexity) is made once and shared by
every run. The runs go one after another here, or as tasks on a Ray cluster (--ray, cluster.py).
They are built in .OUT.sweep/ beside OUT, each moved there when complete; a sweep that stops
(an error, Ctrl-C, a lost machine) resumes from the runs that finished when the same command is
given again, and OUT appears only when every run is there.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import tempfile
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from mosaic_export.bundle.outputs import check_output, write_outputs
from mosaic_export.bundle.report import pareto
from mosaic_export.core.errors import UserError
from mosaic_export.measure.process import machine_label, torch_threads
from mosaic_export.method.passes import measure_model
from mosaic_export.run import cluster, replay
from mosaic_export.run.cluster import Job, Record
from mosaic_export.run.config import RunConfig, prepare
from mosaic_export.run.pipeline import load_stage, run
from mosaic_export.run.stages import DensePass
from mosaic_export.targets import get as get_target
from mosaic_export.targets import names as target_names

FIELDS = ["type", "target", "removed", "perplexity", "memory_bytes", "decode_tokens_per_s",
          "prefill_tokens_per_s", "file_bytes", "predicted_memory_bytes",
          "predicted_decode_tokens_per_s", "machine", "attempts"]
RECORD = "sweep.json"  # in the work folder, then in OUT: the settings and each run's record


def run_job(config: RunConfig, shared: DensePass) -> cluster.Finished:
    """A run on a worker: into a temporary folder there, whose files go back to the driver."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mosaic-export-run-") as tmp:
        out = Path(tmp) / config.out.name
        run(replace(config, out=out, force=False), shared=shared)
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return cluster.Finished(files, machine_label(), time.perf_counter() - t0)


def sweep(config: RunConfig, targets: list[float], log=print) -> list[dict]:
    """Run config at each removal target (all structured) into OUT/r{target}/; on the Ray
    cluster config.ray when given, each run asking for and using config.ray_cpus CPUs (default:
    --threads, else 1) and tried again up to config.retries times (default 2)."""
    _check(config, targets)
    prepare(replace(config, out=None))  # every input, before anything is written
    out, ray = config.out, config.ray
    check_output(out, config.force)
    cpus = cluster.task_cpus(config)
    jobs = make_jobs(config, targets, cpus if ray else None)
    work = _work_path(out)
    with _locked(work, out):
        record = _work_folder(config, jobs, work, log)
        todo = [job for job in jobs if job.name not in record["runs"]]
        if len(todo) < len(jobs):
            log(f"resuming the sweep in {work}: {len(jobs) - len(todo)} of {len(jobs)} runs finished")
        try:
            if todo:
                _execute(todo, config, work, record, log)
        except BaseException:
            if record["runs"]:
                print(f"mosaic-export: the sweep stopped with {len(record['runs'])} of {len(jobs)} "
                      f"runs finished, kept in {work}: the same command resumes it", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
            raise
        rows = [_row(job, json.loads((work / job.name / "report.json").read_text(encoding="utf-8")),
                     record["runs"][job.name]) for job in jobs]
        def finish(folder: Path) -> None:
            replay.write(folder, config, {"targets": list(targets)})
            _write(folder, rows, config.target)

        write_outputs(out, config.force, finish, log, work)
    log(f"wrote {out}/sweep.csv, {out}/pareto.png, {out}/report.md")
    return rows


def _check(config: RunConfig, targets: list[float]) -> None:
    if config.target is None:
        raise UserError(f"a sweep needs a target format (--target {' or '.join(target_names())})")
    if not targets or any(not 0 <= t <= 0.9 for t in targets):
        raise UserError(f"sweep targets must be in [0, 0.9], got {targets}")
    if config.eval_windows == 0:
        raise UserError("a sweep compares perplexity: --eval-windows cannot be 0")


def make_jobs(config: RunConfig, targets: list[float], cpus: int | None = None) -> list[Job]:
    """Every (type, target) of the sweep, as the run it is: type by type, targets in order.
    ``cpus``: runs on a cluster, with that many threads each and the paths made absolute."""
    work = _work_path(config.out)
    option = get_target(config.target).option
    base = config if cpus is None else replace(_absolute(config), threads=cpus)
    jobs = []
    for type_ in config.types or [None]:  # None: the one type of --quant / --dtype / the profile
        for t in sorted(set(targets)):
            name = f"{type_}-r{t:.2f}" if type_ else f"r{t:.2f}"
            settings = replace(base.settings, sparsity=t, structured_fraction=1.0 if t else 0.0)
            typed = {option: type_, "alignment": None} if type_ else {}
            jobs.append(Job(name, replace(base, settings=settings, search=False, types=None,
                                          out=work / name, force=False, ray=None, ray_cpus=None,
                                          retries=None, **typed), t, type_))
    return jobs


def _absolute(config: RunConfig) -> RunConfig:
    """The files a run reads named by absolute paths: a worker does not start in this folder."""
    path = cluster.absolute
    calibration = config.settings.calibration
    recover = config.recover and replace(config.recover,
                                         text=",".join(path(t) for t in config.recover.sources))
    return replace(config, model=path(config.model), profile=path(config.profile),
                   eval_text=path(config.eval_text), plan=path(config.plan), recover=recover,
                   settings=replace(config.settings,
                                    calibration=replace(calibration, source=path(calibration.source))))


def dense_pass(config: RunConfig, log=print) -> DensePass:
    """Load the model and make pass 1 once for all the runs (they differ only after it); the
    model's checks (can it be exported? do the texts fit?) run here, before any run."""

    log("--- sweep: the dense pass, shared by every run")
    inputs = prepare(replace(config, out=None))
    with torch_threads(config.threads):
        dense = load_stage(config, inputs, log)
        loaded = dense.loaded
        measured = measure_model(loaded, dense.calib, inputs.settings, config.calib_batch_size,
                                 inputs.settings.error_kinds(searched=True))  # a sweep removes structure
    return DensePass(measured, dense.perplexity, dense.counts["total"])


def _execute(jobs: list[Job], config: RunConfig, work: Path, record: dict, log) -> None:
    """The dense pass, then each run, here or on the cluster (joined first, so that a wrong
    address fails before the dense pass); each run recorded as it lands in work."""
    with cluster.joined(config):
        shared = dense_pass(config, log)
        runs = _remote(jobs, shared, work, config, log) if config.ray else _local(jobs, shared, log)
        with closing(runs):
            for job, done in runs:
                record["runs"][job.name] = asdict(done)
                _save(work / RECORD, record)


def _local(jobs: list[Job], shared: DensePass, log):
    for job in jobs:
        log(f"--- sweep: {job.name}: {job.target:.0%} of the decoder removed by structure"
            + (f", {job.type}" if job.type else ""))
        t0 = time.perf_counter()
        run(job.config, log=log, shared=shared)
        yield job, Record(machine_label(), time.perf_counter() - t0)


def _remote(jobs: list[Job], shared: DensePass, work: Path, config: RunConfig, log):
    cpus, retries = cluster.task_cpus(config), cluster.task_retries(config)
    memory = cluster.task_memory(4 * shared.params)
    shared_ref = cluster.share(shared)
    calls = {job.name: (job.config, shared_ref) for job in jobs}
    by_name = {job.name: job for job in jobs}
    with closing(cluster.tasks(run_job, calls, memory, cpus, retries, "runs", log)) as runs:
        for name, finished, record in runs:
            job = by_name[name]
            cluster.unpack(finished.value, work / job.name)
            log(f"--- sweep: {job.name} finished on {record.machine} in {record.seconds:.0f} s"
                + (f" (attempt {record.attempts})" if record.attempts > 1 else ""))
            yield job, record


@contextmanager
def _locked(work: Path, out: Path):
    """One sweep at a time into OUT (a lock file beside it, released when the process ends)."""
    import fcntl

    lock = work.with_name(work.name + ".lock")
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another sweep is writing {out} (it holds {lock})") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _work_path(out: Path) -> Path:
    out = out.resolve()
    return out.parent / f".{out.name}.sweep"


def _work_folder(config: RunConfig, jobs: list[Job], work: Path, log) -> dict:
    """The sweep's record, in its work folder: an interrupted sweep's with the same settings (to
    resume), else a new one; an interrupted sweep with other settings is kept unless --force.
    Anything in the folder but the record and the finished runs (a run cut short) is removed."""
    same = replace(config, force=False, ray=None, ray_cpus=None, retries=None)  # where is no matter,
    settings = json.loads(json.dumps({"config": asdict(same),  # but the runs' threads are
                                      "threads": jobs[0].config.threads,
                                      "runs": [job.name for job in jobs]}, default=str))
    try:
        record = json.loads((work / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if work.exists() and (record or {}).get("settings") != settings:
        if record is not None and record.get("runs") and not config.force:
            raise UserError(f"{work} holds an interrupted sweep with other settings: give the same "
                            "settings to resume it, or --force to start over")
        shutil.rmtree(work)
        log(f"removed {work}: an interrupted sweep with other settings")
        record = None
    if record is None:
        work.mkdir()
        record = {"settings": settings, "runs": {}}
        _save(work / RECORD, record)
    finished = {name for name in record["runs"] if (work / name / "report.json").is_file()}
    record["runs"] = {name: r for name, r in record["runs"].items() if name in finished}
    for path in work.iterdir():
        if path.name != RECORD and path.name not in finished:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return record


def _save(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _row(job: Job, report: dict, record: dict) -> dict:
    """A run's row: its perplexity, and its speed and memory as medians over its rounds."""
    section = report[job.config.target]
    figures = section["measured"]["figures"]
    p, cost = report["params"], report.get("cost", {})
    return {"type": report["format"]["type"],
            "target": job.target, "removed": 1 - p["pruned"]["decoder"] / p["dense"]["decoder"],
            "perplexity": report["perplexity"]["pruned"]["perplexity"],
            "memory_bytes": figures["memory"]["median"],
            "decode_tokens_per_s": figures["decode"]["median"],
            "prefill_tokens_per_s": figures["prefill"]["median"],
            "file_bytes": section["benchmark"]["file_bytes"],
            "predicted_memory_bytes": cost.get("predicted", {}).get("memory_bytes"),
            "predicted_decode_tokens_per_s": cost.get("predicted", {}).get("decode_tokens_per_s"),
            "machine": record["machine"], "attempts": record["attempts"]}


def _write(folder: Path, rows: list[dict], fmt_target: str) -> None:
    with open(folder / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    fronts = _plot(folder / "pareto.png", rows, fmt_target)
    machines = sorted({r["machine"] for r in rows})
    several = len(machines) > 1
    lines = ["# mosaic-export sweep", "",
             "Measured on " + ("each run's machine (the last column); fronts are per machine"
                               if several else machines[0]) + ".", "",
             "| type | removed | perplexity | peak memory (MiB) | decode tokens/s | prefill tokens/s | "
             "file (MiB) | on memory front | on speed front |" + " machine |" * several,
             "|---|---|---|---|---|---|---|---|---|" + "---|" * several]
    for i, r in enumerate(rows):
        lines.append(f"| {r['type']} | {r['removed']:.1%} | {r['perplexity']:.3f} | "
                     f"{r['memory_bytes'] / 2**20:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['file_bytes'] / 2**20:.1f} | {'yes' if i in fronts['memory_bytes'] else ''} | "
                     f"{'yes' if i in fronts['decode_tokens_per_s'] else ''} |"
                     + f" {r['machine']} |" * several)
    retried = [r for r in rows if r["attempts"] > 1]
    lines += ["", "![Pareto fronts](pareto.png)", "",
              "Each row is a full run in `r<target>/` (`<type>-r<target>/` with --types) with its "
              "own report."]
    if retried:
        lines += ["", "Runs that needed more than one attempt (the failures are in sweep.json): "
                  + ", ".join(f"{r['type']} {r['target']:.0%} ({r['attempts']} attempts)" for r in retried)
                  + "."]
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot(path: Path, rows: list[dict], fmt_target: str) -> dict[str, set[int]]:
    """The two fronts, each machine's runs on their own (speeds measured on different machines
    are not comparable); returns, per axis, the rows on their machine's front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machines = sorted({r["machine"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fronts: dict[str, set[int]] = {"memory_bytes": set(), "decode_tokens_per_s": set()}
    typed = len({r["type"] for r in rows}) > 1
    for ax, key, scale, label, larger in (
            (axes[0], "memory_bytes", 2**20, "peak memory, context full (MiB)", False),
            (axes[1], "decode_tokens_per_s", 1, "decode tokens/s", True)):
        for m, machine in enumerate(machines):
            index = [i for i, r in enumerate(rows) if r["machine"] == machine]
            pts = [(rows[i][key] / scale, rows[i]["perplexity"]) for i in index]
            front = sorted(pareto(pts, larger), key=lambda j: pts[j][0])
            fronts[key].update(index[j] for j in front)
            color = plt.cm.tab10(m)
            ax.scatter([x for x, _ in pts], [y for _, y in pts], color=color, alpha=0.4, zorder=2)
            ax.plot([pts[j][0] for j in front], [pts[j][1] for j in front], "o-", color=color,
                    label="Pareto front" + (f": {machine}" if len(machines) > 1 else ""), zorder=3)
            for i, (x, y) in zip(index, pts, strict=True):
                ax.annotate(f"{rows[i]['type']} " * typed + f"{rows[i]['removed']:.0%}", (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    where = machines[0] if len(machines) == 1 else f"{len(machines)} machines"
    fig.suptitle(f"quality vs cost across removal targets and types ({fmt_target}, measured on {where})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fronts

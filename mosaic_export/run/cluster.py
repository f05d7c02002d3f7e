"""Work on a Ray cluster (`--ray auto|ADDRESS`): the runs of a sweep, and the joint search's dense
runs of each type (measure_types; the rest of the joint search stays on this machine).

The dense pass (pass 1 over the dense model and its perplexity) runs once, on this machine, and
goes to every run through Ray's object store. Each run (prune, export, runtime benchmark,
perplexity) is one Ray task in a fresh worker process, asking for the CPUs given and the memory
its model needs (task_memory); it writes its folder on the worker and sends the files back, so
workers need no shared disk: only the model, profile and text paths must be readable on each.

A task that fails or is killed (its worker or its node lost) is submitted again, up to
`retries` more times; every failure is recorded and reported. What the user asked for is
checked at the door, before any task, so an error on a worker (a path it lacks, a full disk) is
one of its machine and is retried like a crash. Runs arrive as they finish (`tasks` yields them)
and are written into the sweep's work folder at once, so an interrupted sweep resumes from them;
past the last attempt, the runs that finished meanwhile are handed back before the error.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mosaic_export.bundle.outputs import TMP_INFIX
from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes
from mosaic_export.decide.benchmarks import export_format
from mosaic_export.decide.costmodel import Format
from mosaic_export.measure.process import machine_label, torch_threads
from mosaic_export.model.load import load_model

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mosaic_export.run.config import RunConfig
    from mosaic_export.targets.base import Evaluation

# A run's resident-memory high-water mark over its model's float32 size, measured for the whole
# main job on SmolLM2-135M (30% structured, from outside the process): 3.27x. The runtime's
# benchmark runs in a child process holding at most the float32 model again.
PEAK_OVER_FP32 = 3.3 + 1.0
HEADROOM = 512 * 2**20  # Python, torch and the runtime's libraries


@dataclass(frozen=True)
class Job:
    """One run of a sweep: its folder's name and its configuration (out: that folder)."""

    name: str
    config: RunConfig
    target: float  # the share of the decoder removed by structure
    type: str | None  # the type swept (--types), None: the run's one type


@dataclass(frozen=True)
class Finished:
    """What a task sends back: its result, where it ran, how long it took."""

    value: object  # a sweep's run: {path in its folder: contents}; a dense run: its benchmark
    machine: str
    seconds: float


@dataclass
class Record:
    """A finished run, for the sweep's record: where it ran, after how many attempts."""

    machine: str
    seconds: float
    attempts: int = 1
    failures: list[str] | None = None


def task_memory(fp32_bytes: int) -> int:
    """The memory one run asks Ray for: its model's float32 size times the measured peak."""
    return int(PEAK_OVER_FP32 * fp32_bytes) + HEADROOM


def unpack(files: dict[str, bytes], folder: Path) -> None:
    """A run's files written as its folder, moved into place only when complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_INFIX}{os.getpid()}-", dir=folder.parent))
    try:
        for name, data in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        tmp.chmod(0o777 & ~_umask())
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when moved into place


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    return ray


def connect(address: str) -> bool:
    """Join the cluster at address ("auto": the one this machine belongs to, else a new local
    one for this sweep). Returns whether this call started Ray (and so shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    kw = dict(log_to_driver=True, configure_logging=False)
    try:
        if address != "auto":
            ray.init(address=address, **kw)
        else:
            try:
                ray.init(address="auto", **kw)
            except ConnectionError:
                ray.init(**kw)  # no running cluster: one on this machine, for this sweep
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--ray {address}: cannot join the Ray cluster ({e})") from None
    finally:
        for sig, handler in handlers.items():  # Ray's own would exit without cleaning up
            signal.signal(sig, handler)
    return True


def disconnect() -> None:
    _ray().shutdown()


def task_cpus(config: RunConfig) -> int:
    """The CPUs each task asks for and uses: --ray-cpus, else --threads, else 1."""
    return config.ray_cpus or config.threads or 1


def task_retries(config: RunConfig) -> int:
    return 2 if config.retries is None else config.retries


@contextmanager
def joined(config: RunConfig):
    """On the cluster config.ray for the block (nothing when None): joined, refused when no node
    has task_cpus, and left afterwards when this call joined it."""
    if not config.ray:
        yield
        return
    started = connect(config.ray)
    try:
        check_fits(task_cpus(config), 0)
        yield
    finally:
        if started:
            disconnect()


def check_fits(cpus: int, memory: int) -> None:
    """Refuse a run that no node of the cluster could ever take (Ray would wait for ever)."""
    ray = _ray()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("memory", 0) >= memory for r in nodes):
        largest = max(nodes, key=lambda r: r.get("CPU", 0), default={})
        raise UserError(f"each task asks for {cpus} CPU(s) and {format_bytes(memory)}; no node of the "
                        f"Ray cluster offers that (the largest: {largest.get('CPU', 0):g} CPUs, "
                        f"{format_bytes(int(largest.get('memory', 0)))})")


def tasks(function, calls: dict[str, tuple], memory: int, cpus: int, retries: int, what: str,
          log=print) -> Iterator[tuple[str, Finished, Record]]:
    """function(*args) as a Ray task for each name -> args of calls; yields (name, what it
    returned, its record) as each finishes. A failed attempt is submitted again up to `retries`
    times; past that, what finished meanwhile is yielded, then a UserError is raised."""
    ray = _ray()
    check_fits(cpus, memory)
    task = ray.remote(num_cpus=cpus, memory=memory, max_retries=0, max_calls=1,
                      runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})(function)
    log(f"Ray: {len(calls)} {what}, each asking for {cpus} CPU(s) and {format_bytes(memory)}; "
        f"cluster: {ray.cluster_resources().get('CPU', 0):g} CPUs")
    pending = {task.remote(*args): (name, 1) for name, args in calls.items()}
    failures: dict[str, list[str]] = {name: [] for name in calls}
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            name, attempt = pending.pop(ref)
            try:
                finished = ray.get(ref)
            except ray.exceptions.RayError as e:
                if _failed(name, attempt, e, retries, failures[name], log):
                    pending[task.remote(*calls[name])] = (name, attempt + 1)
                    continue
                yield from _done(ray, pending, failures)  # hand back what finished meanwhile
                raise UserError(f"{name} failed {attempt} times ({'; '.join(failures[name])})") from None
            yield name, finished, Record(finished.machine, finished.seconds, attempt,
                                         failures[name] or None)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def share(value):
    """value in Ray's object store, for every task to read (a reference to pass as an argument)."""
    return _ray().put(value)


def _failed(name: str, attempt: int, error, retries: int, failures: list[str], log) -> bool:
    """Record a failed attempt (an error of the worker's machine, such as a path it lacks or a
    full disk, as much as a crash); whether to try again."""
    cause = getattr(error, "cause", None)
    what = f"{type(cause or error).__name__}: {' '.join(str(cause or error).split())[:300]}"
    failures.append(f"attempt {attempt}: {what}")
    log(f"{name}: attempt {attempt} failed ({what})" + ("; trying again" if attempt <= retries else ""))
    return attempt <= retries


def _done(ray, pending: dict, failures: dict):
    """The tasks among pending that have already finished, without waiting for the others."""
    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
    for ref in done:
        name, attempt = pending.pop(ref)
        try:
            finished = ray.get(ref)
        except ray.exceptions.RayError:
            continue
        yield name, finished, Record(finished.machine, finished.seconds, attempt,
                                     failures[name] or None)


# --- the joint search's dense runs: the dense model at each type, in its runtime, on a worker


def measure_type(model: str | None, target: str, type_: str, probe_text: str,
                 evaluation: Evaluation) -> Finished:
    """On a worker: the dense model exported at type_ and run in its runtime on the probe text
    (quality.measure_types, for one type): one run, its benchmark result. (Each worker measures
    one type beside other tasks: rounds interleaved with other types' runs are not possible
    there, so a cluster's dense runs are one run each, and do not anchor the cost model.)"""

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mosaic-export-type-") as tmp, torch_threads(evaluation.threads):
        probe = Path(tmp) / "probe.txt"
        probe.write_text(probe_text, encoding="utf-8")
        loaded = load_model(model)
        fmt = Format(target, type_)
        path = export_format(loaded, fmt, Path(tmp) / f"dense-{type_}")
        result = fmt.spec.benchmark(path, **replace(evaluation, eval_text=str(probe)).benchmark_options())
    return Finished(result, machine_label(), time.perf_counter() - t0)


def measure_types(config: RunConfig, params: int, probe: Path, evaluation: Evaluation,
                  log=print) -> dict[str, dict]:
    """quality.measure_types on the cluster config.ray: {type: benchmark result}, each with the
    machine it was measured on under "machine" (and "attempts")."""
    cpus = task_cpus(config)
    evaluation = replace(evaluation, threads=cpus)
    calls = {t: (absolute(config.model), config.target, t, probe.read_text(encoding="utf-8"), evaluation)
             for t in config.types}
    out = {}
    with joined(config):
        for t, finished, record in tasks(measure_type, calls, task_memory(4 * params), cpus,
                                         task_retries(config), "dense runs (one per type)", log):
            out[t] = {**finished.value, "machine": record.machine, "attempts": record.attempts}
            p = out[t]["perplexity"]["perplexity"]
            log(f"  dense {t}: probe perplexity {p:.3f}, {out[t]['file_bytes'] / 2**20:.1f} MiB, decode "
                f"{out[t]['decode']['tokens_per_s']:.1f} tokens/s (on {record.machine})")
    return {t: out[t] for t in config.types}


def absolute(path: str | None) -> str | None:
    """A path as a worker can read it (it does not start in this folder); a name (a built-in
    profile, text or model) as it is."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path

"""A sweep on a local Ray cluster (cluster.py): a head without CPUs and two workers with one CPU
each, on this machine. The runs, made as Ray tasks in fresh worker processes and sent back
through the object store, must give the same plans and the same files as the sequential sweep;
a run whose worker is killed mid-run is tried again, and the retry is recorded (one sweep checks
both: each costs half a minute)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mosaic_export.cli import main
from tests.unit.test_budgets import FAST, PROFILE

pytestmark = pytest.mark.integration

TARGETS = ["--targets", "0", "0.2", "0.4"]
RUNS = ["r0.00", "r0.20", "r0.40"]
TASK = "ray::run_job"  # a Ray worker's process title while it runs a sweep's run


@pytest.fixture(scope="module")
def sweep_args(tiny_model_dir, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile") / "tiny.toml"
    profile.write_text(PROFILE)
    # One thread: the same arithmetic here and in a one-CPU Ray task, so the same bytes
    return ["sweep", "--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--threads", "1",
            *TARGETS]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def sequential(sweep_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential") / "sweep"
    assert main([*sweep_args, "--out", str(out)]) == 0
    return out


def _artifacts(out: Path) -> dict[str, str]:
    """sha256 of every file of every run but those that carry timings or measurements (the
    report, its plots and the README and manifest made from it; run.toml, which names the folder)."""
    varying = {"report.json", "report.md", "README.md", "manifest.json", "cost.png", "run.toml"}
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("r*/**/*")) if p.is_file() and p.name not in varying}


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


def _ours(pid: int) -> bool:
    """Is pid a descendant of this test process (a worker of this test's cluster, not of another
    Ray on the machine)?"""
    while pid > 1:
        pid = _parent(pid)
        if pid == os.getpid():
            return True
    return False


def _kill_first_run(killed: list[int], stop: threading.Event) -> None:
    """Kill (SIGKILL) the first worker process of this test's cluster seen running a sweep's run."""
    while not stop.is_set() and not killed:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                if not title.startswith(TASK) or not _ours(int(pid)):
                    continue
            except (OSError, ValueError, IndexError):
                continue
            if title.startswith(TASK):
                time.sleep(1)  # mid-run: it has loaded the model and started pruning
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.05)


def test_ray_sweep_matches_the_sequential_one_and_retries_a_killed_run(ray_cluster, sweep_args,
                                                                      sequential, tmp_path, capsys):
    """One sweep on the cluster, one of whose runs has its worker killed mid-run: the run is tried
    again and recorded, and every run has the sequential sweep's plan and files."""
    out, killed, stop = tmp_path / "sweep", [], threading.Event()
    killer = threading.Thread(target=_kill_first_run, args=(killed, stop))
    killer.start()
    try:
        assert main([*sweep_args, "--ray", ray_cluster.address, "--out", str(out)]) == 0
    finally:
        stop.set()
        killer.join()
    printed = capsys.readouterr().out
    assert "Ray: 3 runs, each asking for 1 CPU(s)" in printed and killed, "no run was seen running"
    got, want = _artifacts(out), _artifacts(sequential)
    assert {Path(k).parts[0] for k in want} == set(RUNS)
    assert any(k.endswith("plan.json") for k in want) and any(k.endswith(".onnx") for k in want)
    assert got == want
    for run in RUNS:
        assert json.loads((out / run / "plan.json").read_text()) == \
            json.loads((sequential / run / "plan.json").read_text())
    record = json.loads((out / "sweep.json").read_text())["runs"]
    assert sorted(r["attempts"] for r in record.values()) == [1, 1, 2], record
    [retried] = [r for r in record.values() if r["attempts"] == 2]
    assert retried["failures"][0].startswith("attempt 1: WorkerCrashedError")
    assert "2 attempts" in (out / "report.md").read_text()
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 4 and sorted(r[-1] for r in rows[1:]) == ["1", "1", "2"]
    assert main(["verify", str(out / "r0.40")]) == 0
    assert not (tmp_path / ".sweep.sweep").exists()


def test_a_run_no_node_can_take_is_refused_before_the_dense_pass(ray_cluster, sweep_args, tmp_path,
                                                                  capsys):
    out = tmp_path / "sweep"
    assert main([*sweep_args, "--ray", ray_cluster.address, "--ray-cpus", "4", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "asks for 4 CPU(s)" in captured.err and "no node of the Ray cluster" in captured.err
    assert "dense pass" not in captured.out and not list(tmp_path.iterdir())


def test_joint_search_measures_each_type_on_the_cluster(ray_cluster, tiny_model_dir, sweep_args, tmp_path):
    """The joint search's dense runs (one per type) as Ray tasks: the same measured quality and
    the same choice as on this machine, each run labelled with the machine it ran on."""
    from mosaic_export.model.load import load_model
    from tests.unit.test_joint import FAST as JOINT_FAST
    from tests.unit.test_joint import _pricings

    loaded = load_model(str(tiny_model_dir))
    size = {t: p.cost([loaded.shape.dense_dims] * loaded.shape.n_layers).memory_bytes
            for t, p in _pricings(loaded.shape).items()}
    args = ["--model", str(tiny_model_dir), "--profile", sweep_args[4], *JOINT_FAST, "--threads", "1",
            "--types", "fp32", "fp16", "--max-memory", f"{int((size['fp16'] + size['fp32']) / 2)}B",
            "--margin", "0"]
    reports = {}
    for where, extra in (("here", []), ("ray", ["--ray", ray_cluster.address])):
        assert main([*args, *extra, "--out", str(tmp_path / where)]) == 0
        reports[where] = json.loads((tmp_path / where / "report.json").read_text())["joint"]
    here, ray = reports["here"], reports["ray"]
    assert ray["quality"]["type_deltas"] == here["quality"]["type_deltas"]
    assert ray["chosen"] == here["chosen"]
    runs = ray["quality"]["probe"]["dense_runs"]
    assert set(runs) == {"fp32", "fp16"} and all(r["machine"] for r in runs.values())
    text = (tmp_path / "ray" / "report.md").read_text()
    assert "Where the dense runs were measured: fp32, fp16 on " in text

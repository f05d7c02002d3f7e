"""--max-rss as a limit on the whole process tree (mosaic_export/measure/tree.py): children are
counted, a child that would take the tree over the limit is stopped, and the run stops cleanly
with the figure, nothing written."""

from __future__ import annotations

import os

import pytest

from mosaic_export.cli import main
from mosaic_export.core.units import format_bytes
from mosaic_export.measure import tree
from mosaic_export.measure.process import run_child
from mosaic_export.measure.tree import MemoryLimit, MemoryLimitExceeded, rss_bytes

MIB = 2**20


def test_the_tree_counts_the_children():
    """A child holding 120 MiB is counted in the tree's peak on top of this process."""
    own = rss_bytes(os.getpid())
    with MemoryLimit(own + 2048 * MIB) as watch:
        assert run_child("tests.crashing_child", ["eat", "--mib", "120"], "x", "testing", "y") == {"ok": True}
    assert watch.exceeded is None
    assert watch.peak >= own + 120 * MIB
    assert len(watch.peak_each) == 2  # this process and the child


@pytest.mark.parametrize("cgroups", [False, True], ids=["watched", "cgroup where the system allows"])
def test_a_child_over_the_limit_stops_the_run_with_the_figure(cgroups):
    own = rss_bytes(os.getpid())
    limit = own + 150 * MIB
    with pytest.raises(MemoryLimitExceeded) as e, MemoryLimit(limit, use_cgroups=cgroups):
        run_child("tests.crashing_child", ["eat", "--mib", "400"], "x", "testing", "y")
    message = str(e.value)
    assert "over" in message and "--max-rss" in message and message.endswith("; stopped, nothing was written")
    assert tree.active() is None  # the limit ends with its block


def test_this_process_over_the_limit_is_stopped():
    """The watch interrupts this process itself when it grows past the limit."""
    own = rss_bytes(os.getpid())
    with pytest.raises(MemoryLimitExceeded, match="held .* over --max-rss"), MemoryLimit(own + 100 * MIB):
        held = []
        for _ in range(60):  # up to 600 MiB, 10 MiB at a time, touched
            held.append(bytearray(10 * MIB))
            for i in range(0, 10 * MIB, 4096):
                held[-1][i] = 1
    del held


def test_a_run_over_the_limit_stops_cleanly(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A --max-rss the door lets through (its estimate is made small here) that this process and
    its llama.cpp child cannot keep together: the run stops with the figure, exit 2, and writes
    nothing."""
    from mosaic_export.run import memory

    monkeypatch.setattr(memory, "estimate", lambda *a, **k: (1, {"a phase": 1}))
    out = tmp_path / "out"
    limit = rss_bytes(os.getpid()) // MIB + 20  # this process now, and 20 MiB: a llama.cpp child needs more
    code = main(["--model", str(tiny_model_dir), "--sparsity", "0.3", "--structured-fraction", "1",
                 "--target", "gguf", "--quant", "F32", "--calib-samples", "2", "--calib-seq-len", "32",
                 "--eval-windows", "0", "--max-rss", f"{limit}MiB", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err  # progress bars, then one error line
    assert err.count("mosaic-export: error: ") == 1
    line = err.split("mosaic-export: error: ")[1].strip()
    assert f"--max-rss {format_bytes(limit * MIB)}" in line
    assert line.endswith("; stopped, nothing was written")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_cgroup_base_reads_v1_and_v2_and_says_none_elsewhere(tmp_path):
    """/proc/self/cgroup's lines: v1's memory hierarchy, v2's unified one where memory is
    delegated to the children; none where the folder is missing, not delegated, or unreadable."""
    from mosaic_export.measure.tree import cgroup_base

    v1 = tmp_path / "memory" / "job"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_base("4:memory:/job\n0::/\n", tmp_path) == (v1, "memory.limit_in_bytes")
    v2 = tmp_path / "svc"
    v2.mkdir()
    (v2 / "cgroup.subtree_control").write_text("cpu memory pids\n")
    assert cgroup_base("0::/svc\n", tmp_path) == (v2, "memory.max")
    (v2 / "cgroup.subtree_control").write_text("cpu pids\n")  # memory not delegated
    assert cgroup_base("0::/svc\n", tmp_path) == (None, "")
    assert cgroup_base("0::/not-here\n", tmp_path) == (None, "")  # the folder not visible: no crash
    assert cgroup_base("garbage\n1:cpu:/x\n", tmp_path) == (None, "")


def test_children_are_confined_where_the_system_allows(tmp_path):
    """Where this process may make memory cgroups (root in most containers, cgroup v1 here), an
    armed limit puts each child into one and removes it when the child ends; before arming, a
    child is only watched."""
    from mosaic_export.measure.tree import cgroup_base

    base, _ = cgroup_base()
    own = rss_bytes(os.getpid())
    with MemoryLimit(own + 2048 * MIB, armed=False) as watch:
        assert not watch.adopt(os.getpid())  # not armed: nothing confined
        watch.arm()
        run_child("tests.crashing_child", ["ok"], "x", "testing", "y")
        assert watch._cgroups.limits == {}  # the child's group went with it
    if base is not None:
        assert not list(base.glob(f"mosaic-{os.getpid()}-*"))

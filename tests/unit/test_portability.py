"""Runs anywhere and fails cleanly: runtime crashes, signals, debris, --force, a full disk,
relative budgets, parity floors and tokenizer ids through llama.cpp. Nothing here needs a CPU
with AMX: the crash of llama.cpp's AMX path is simulated by a child that kills itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mosaic_export.bundle import outputs
from mosaic_export.cli import main
from mosaic_export.core.errors import UserError
from mosaic_export.decide.profile import load_profile
from mosaic_export.measure.process import RuntimeCrash, run_child
from mosaic_export.targets.gguf import runner as gguf_runner
from mosaic_export.targets.gguf import table as gguf_table
from mosaic_export.targets.gguf import tokenizer as gguf_tokenizer
from mosaic_export.targets.gguf import writer as gguf

FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2", "--eval-seq-len", "64"]
REPO = Path(__file__).resolve().parents[2]


def _cli(tiny_model_dir, out, *extra):
    return ["--model", str(tiny_model_dir), "--profile", "laptop-cpu", *FAST, "--out", str(out), *extra]


@pytest.fixture
def fresh_fallback(monkeypatch):
    """This process has not fallen back to llama.cpp's safe setting yet."""
    monkeypatch.setattr(gguf_runner, "_fallback", {"safe": False, "reason": None})
    monkeypatch.delenv(gguf_runner.SAFE_ENV, raising=False)


# --- runtime children -------------------------------------------------------------------------------


def test_a_crash_is_named_with_its_signal_and_the_final_file_name():
    with pytest.raises(RuntimeCrash) as e:
        run_child("tests.crashing_child", ["segv"], "llama.cpp", "decoding", "model-Q8_0.gguf")
    assert str(e.value) == "llama.cpp crashed (SIGSEGV) while decoding model-Q8_0.gguf"
    assert e.value.signal_name == "SIGSEGV"


def test_a_failure_names_the_file_and_the_childs_own_line():
    with pytest.raises(UserError, match=r"^llama.cpp could not run model-Q8_0.gguf \(benchmarking\): "
                                        r"the model file is broken$"):
        run_child("tests.crashing_child", ["fail"], "llama.cpp", "benchmarking", "model-Q8_0.gguf")


def test_a_crash_of_the_quantizer_child_is_named(tiny_model_dir, monkeypatch):
    """llama.cpp's quantizer runs in a child like every llama.cpp call (here: reading the types a
    quantized GGUF will hold); its crash is reported by name, not the end of this process."""
    from mosaic_export.model.load import load_model
    from mosaic_export.targets.gguf.pricing import intended_types

    monkeypatch.setattr(gguf_runner, "MODULE", "tests.crashing_child")
    monkeypatch.setenv("CRASHING_CHILD_MODE", "segv")
    with pytest.raises(RuntimeCrash) as e:
        intended_types(load_model(str(tiny_model_dir)), "Q4_K_M")
    assert str(e.value) == ("llama.cpp crashed (SIGSEGV) while quantizing to Q4_K_M the stand-in file that "
                            "tells each tensor's type")


def test_the_runtime_children_import_no_torch():
    """The runners measure the runtime's own memory and start fast: no torch in them. Checked at
    import; that covers what they import while measuring too, since tests/unit/test_layers.py allows
    no project import inside a function of a runner (one inside measure() once carried torch's ~185
    MiB into every runtime child: BENCHMARKS.md)."""
    code = ("import sys, mosaic_export.targets.gguf.runner, mosaic_export.targets.onnx.runner, "
            "mosaic_export.targets.onnx.genai; print(sorted(m for m in ('torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie has ended; its reaper is not us


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_child_dies_with_its_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("from mosaic_export.measure.process import run_child; "
            f"run_child('tests.crashing_child', ['sleep', '--pid-file', {str(pid_file)!r}], 'x', 'y', 'z')")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()  # SIGKILL: no handler of the parent runs
    parent.wait()
    for _ in range(100):
        if _dead(child):
            break
        time.sleep(0.05)
    assert _dead(child)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    from mosaic_export.model.load import load_model

    path = tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf"
    gguf.export(load_model(str(tiny_model_dir)), path, "F32")
    return path


def test_llama_crash_is_retried_with_the_safe_setting(tiny_gguf, fresh_fallback, monkeypatch, capsys):
    monkeypatch.setenv(gguf_runner.FAULT_ENV, "1")
    r = gguf_runner.benchmark(tiny_gguf, prompt_tokens=16, gen_tokens=4, eval_windows=0, threads=1)
    assert r["decode"]["tokens"] == 4
    assert r["llama_setup"]["extra_buffer_types"] is False
    crash = "llama.cpp crashed (SIGSEGV) while benchmarking tiny-F32.gguf"
    assert crash in r["llama_setup"]["fallback_after"]
    assert "running it again with llama.cpp's extra buffer types off" in capsys.readouterr().err
    # the rest of the process's runs start with the safe setting: no second crash
    again = gguf_runner.benchmark(tiny_gguf, prompt_tokens=16, gen_tokens=4, eval_windows=0, threads=1)
    assert again["llama_setup"]["extra_buffer_types"] is False
    assert capsys.readouterr().err == ""


def test_without_a_crash_the_extra_buffer_types_stay_on(tiny_gguf, fresh_fallback):
    r = gguf_runner.benchmark(tiny_gguf, prompt_tokens=16, gen_tokens=4, eval_windows=0, threads=1)
    assert r["llama_setup"] == {"extra_buffer_types": True, "fallback_after": None}


def test_no_fallback_when_told_not_to(tiny_gguf, fresh_fallback, monkeypatch):
    monkeypatch.setenv(gguf_runner.FAULT_ENV, "1")
    monkeypatch.setenv(gguf_runner.SAFE_ENV, "0")
    with pytest.raises(RuntimeCrash, match=r"crashed \(SIGSEGV\) while benchmarking tiny-F32.gguf"):
        gguf_runner.benchmark(tiny_gguf, prompt_tokens=16, gen_tokens=4, eval_windows=0, threads=1)


def test_main_command_and_verify_survive_a_crashing_runtime(tiny_model_dir, tmp_path, fresh_fallback,
                                                            monkeypatch, capsys):
    """The README's flow on a machine where llama.cpp's fast path crashes: build, then verify."""
    monkeypatch.setenv(gguf_runner.FAULT_ENV, "1")
    out = tmp_path / "out"
    assert main(_cli(tiny_model_dir, out, "--sparsity", "0.2", "--structured-fraction", "1",
                     "--target", "gguf", "--quant", "F32")) == 0
    report = json.loads((out / "report.json").read_text())
    setup = report["gguf"]["benchmark"]["llama_setup"]
    assert setup["extra_buffer_types"] is False and "SIGSEGV" in setup["fallback_after"]
    assert report["gguf"]["parity"]["tokenizer_ids_match"] is True
    assert "## Runtime set-up" in (out / "report.md").read_text()
    monkeypatch.setattr(gguf_runner, "_fallback", {"safe": False, "reason": None})  # a new process
    assert main(["verify", str(out)]) == 0
    assert "crashed (SIGSEGV)" in capsys.readouterr().err


# --- signals and debris ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_build_leaves_nothing(tiny_model_dir, tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mosaic_export", *_cli(tiny_model_dir, out, "--sparsity", "0.2",
                                                         "--target", "gguf", "--quant", "F32")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):  # until the build has started writing
        if list(tmp_path.glob(".out.tmp-*")) or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert f"terminated ({signal.Signals(sig).name})" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    children = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert children == ""


def test_stale_temporaries_of_killed_runs_are_removed(tiny_model_dir, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    unknown = tmp_path / ".out.tmp-q1w2e3r4"  # an older name, without a process id
    live = tmp_path / f".out.tmp-{os.getpid()}-zzz999"  # a run that is still going
    for d in (stale, unknown, live):
        (d / "model").mkdir(parents=True)
    assert main(_cli(tiny_model_dir, tmp_path / "out", "--sparsity", "0.2", "--target", "none")) == 0
    printed = capsys.readouterr().out
    assert not stale.exists() and f"removed {stale.name}" in printed
    assert unknown.exists() and f"{unknown} was left by an earlier run" in printed
    assert live.exists()


# --- --force -----------------------------------------------------------------------------------------


def test_force_refuses_a_folder_that_is_not_an_output(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(_cli(tiny_model_dir, out, "--sparsity", "0.2", "--target", "none", "--force")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force will not replace" in err and "not an output folder" in err
    assert (out / "thesis.tex").read_text() == "years of work"


def test_force_refuses_a_sweep_folder_whose_runs_are_not_ours(tiny_model_dir, tmp_path, capsys):
    """A folder with sweep.csv is a sweep only when every run's manifest.json is one of ours."""
    out = tmp_path / "sweep"
    (out / "r0.10").mkdir(parents=True)
    (out / "sweep.csv").write_text("type,target\n")
    (out / "r0.10" / "manifest.json").write_text('{"name": "someone else\'s package"}')
    assert main(_cli(tiny_model_dir, out, "--sparsity", "0.2", "--target", "none", "--force")) == 2
    assert "not an output folder of mosaic-export" in capsys.readouterr().err
    assert (out / "r0.10" / "manifest.json").is_file()
    (out / "r0.10" / "manifest.json").write_text('{"manifest_version": 1}')  # a run of ours
    assert outputs.is_tool_output(out)


def test_force_refuses_the_current_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert main(_cli(tiny_model_dir, Path("."), "--sparsity", "0.2", "--target", "none", "--force")) == 2
    assert "--force will not replace" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_force_replaces_an_output_or_an_empty_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert main(_cli(tiny_model_dir, out, "--sparsity", "0.2", "--target", "none", "--force")) == 0
    assert (out / "manifest.json").is_file()
    assert main(_cli(tiny_model_dir, out, "--sparsity", "0.3", "--target", "none", "--force")) == 0
    assert json.loads((out / "plan.json").read_text())["settings"]["sparsity"] == 0.3


# --- a full disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 256 KiB (root only: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_small_disk_is_refused_before_the_work(tiny_model_dir, small_disk, capsys):
    assert main(_cli(tiny_model_dir, small_disk / "out", "--sparsity", "0.2", "--target", "none")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not enough free space" in err
    assert list(small_disk.iterdir()) == []


def test_a_disk_that_fills_up_mid_write_ends_in_one_line(tiny_model_dir, small_disk, monkeypatch, capsys):
    monkeypatch.setattr(outputs, "output_bytes_needed", lambda *a: 0)  # the estimate is wrong
    assert main(_cli(tiny_model_dir, small_disk / "out", "--sparsity", "0.2", "--target", "none")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err.lower(), err
    assert list(small_disk.iterdir()) == []


# --- relative budgets --------------------------------------------------------------------------------


def test_relative_budgets_resolve_against_the_dense_figures():
    p = load_profile("laptop-cpu").with_budgets(max_memory="0.9x", min_tokens_per_s="1.15x",
                                                max_ttft="0.8x")
    assert dict(p.budgets.relative) == {"max_memory": 0.9, "min_tokens_per_s": 1.15, "max_ttft": 0.8}
    r = p.resolve_relative(1000 * 2**20, 100.0, 0.5)
    assert r.budgets.max_memory_bytes == int(0.9 * 1000 * 2**20)
    assert r.budgets.min_tokens_per_s == pytest.approx(115.0)
    assert r.budgets.max_ttft_s == pytest.approx(0.4)
    # an absolute value given later replaces a relative one
    q = p.with_budgets(max_memory="300MiB")
    assert q.budgets.max_memory_bytes == 300 * 2**20 and "max_memory" not in dict(q.budgets.relative)


@pytest.mark.parametrize("flag,value,message", [
    ("--max-memory", "0x", "expected a positive factor"),
    ("--max-memory", "ninex", "expected a factor of the dense model's figure"),
    ("--min-tokens-per-s", "fast", "expected tokens/s (60) or a factor"),
    ("--max-ttft", "-2x", "expected a positive factor"),
])
def test_bad_relative_budgets(tiny_model_dir, tmp_path, capsys, flag, value, message):
    assert main(_cli(tiny_model_dir, tmp_path / "out", f"{flag}={value}")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and flag in err
    assert not (tmp_path / "out").exists()


def test_relative_budgets_need_a_target(tiny_model_dir, tmp_path, capsys):
    assert main(_cli(tiny_model_dir, tmp_path / "out", "--sparsity", "0.2", "--target", "none",
                     "--max-memory", "0.9x")) == 2
    assert "relative budgets" in capsys.readouterr().err


def test_a_relative_budget_drives_the_search(tiny_model_dir, tmp_path, capsys):
    from tests.unit.test_budgets import PROFILE

    profile = tmp_path / "tiny.toml"
    profile.write_text(PROFILE)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--profile", str(profile), *FAST, "--max-memory", "0.9x",
                 "--dtype", "fp32", "--margin", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "budgets relative to the dense model (onnx:fp32, measured prediction): max_memory 0.9x" in printed
    report = json.loads((out / "report.json").read_text())
    dense = report["cost"]["search"]["dense"]
    assert dense["removal_target"] == 0
    assert report["budgets"]["max_memory_bytes"] == int(0.9 * dense["predicted"]["memory_bytes"])
    assert report["cost"]["predicted"]["memory_bytes"] <= report["budgets"]["max_memory_bytes"]


# --- parity floors and tokenizer ids -----------------------------------------------------------------


def test_parity_floors_per_type():
    gguf.check_parity("F32", {"top1_agreement": 0.995, "positions": 512}, "m.gguf")
    gguf.check_parity("Q4_K_M", {"top1_agreement": 0.86, "positions": 512}, "m.gguf")
    with pytest.raises(UserError, match=r"m.gguf disagrees .* 90.0% of 512 .* \(floor for Q8_0: 92%\)"):
        gguf.check_parity("Q8_0", {"top1_agreement": 0.90, "positions": 512}, "m.gguf")
    with pytest.raises(UserError, match="floor for F32: 99%"):
        gguf.check_parity("F32", {"top1_agreement": 0.98, "positions": 512}, "m.gguf")
    assert set(gguf_table.MIN_AGREEMENT) == set(gguf_table.TYPES)


def test_tokenizer_ids_must_match():
    parity = {"top1_agreement": 1.0, "positions": 8, "text_ids": [1, 2, 3, 4]}
    gguf.check_parity("F32", parity, "m.gguf", [1, 2, 3, 4])
    with pytest.raises(UserError, match=r"tokenizes text differently .* at token 2: \[9, 4\] vs \[3, 4\]"):
        gguf.check_parity("F32", {**parity, "text_ids": [1, 2, 9, 4]}, "m.gguf", [1, 2, 3, 4])


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert gguf_tokenizer.pre_tokenizer_name(byte_level) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    byte_level]}
    assert gguf_tokenizer.pre_tokenizer_name(smollm) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_tokenizer.LLAMA3_SPLIT}, "behavior": "Isolated"},
        {**byte_level, "use_regex": False}]}
    assert gguf_tokenizer.pre_tokenizer_name(llama3) == "llama-bpe"
    with pytest.raises(UserError, match="pre-tokenizer .* is not one of those mapped"):
        gguf_tokenizer.pre_tokenizer_name({"type": "Whitespace"})


def test_llama_cpp_tokenizes_like_the_source_and_a_wrong_pre_type_is_caught(tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    from mosaic_export.model.load import load_model

    loaded = load_model(str(tiny_model_dir))
    probe = gguf_tokenizer.tokenizer_probe()
    source = gguf_tokenizer.source_token_ids(loaded, probe)
    gguf.export(loaded, tmp_path / "right.gguf", "F32")
    right = gguf_runner.next_token_agreement(loaded.model, tmp_path / "right.gguf", source[:32], text=probe)
    assert right["text_ids"] == source
    # the name this exporter used to write for every BPE tokenizer
    monkeypatch.setitem(gguf_tokenizer.PRE_TOKENIZERS, (("ByteLevel", True),), "default")
    gguf.export(loaded, tmp_path / "wrong.gguf", "F32")
    wrong = gguf_runner.next_token_agreement(loaded.model, tmp_path / "wrong.gguf", source[:32], text=probe)
    with pytest.raises(UserError, match="tokenizes text differently"):
        gguf.check_parity("F32", wrong, "wrong.gguf", source)

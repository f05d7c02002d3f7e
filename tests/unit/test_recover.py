"""Recovery by distillation on the tiny model: the loss, the schedule, masks, resume, self text."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mosaic_export.cli import main
from mosaic_export.core.errors import UserError
from mosaic_export.method.recover import RecoverSettings, distill, kd_loss, lr_at, training_windows
from mosaic_export.method.self_text import self_text
from mosaic_export.model.load import load_model

FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-windows", "2", "--eval-seq-len", "64"]
SETTINGS = RecoverSettings(tokens=48 * 32, seq_len=32, batch=2, lr=2e-3, warmup=0.1, text="builtin")


def test_kd_loss_is_the_kl_divergence():
    t = torch.randn(3, 5, 11)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(3, 5, 11)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(kd_loss(s, t)) == pytest.approx(float(kl), rel=1e-5)
    p2, q2 = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    kl2 = (p2 * (p2.log() - q2.log())).sum(-1).mean() * 4
    assert float(kd_loss(s, t, temperature=2.0)) == pytest.approx(float(kl2), rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(i, 20, 1.0, 0.2) for i in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_at(0, 10, 1.0, 0.0) == pytest.approx(1.0)


def test_settings_are_checked():
    with pytest.raises(UserError, match="--recover-tokens must be at least one window"):
        RecoverSettings(tokens=10, seq_len=32).validate()
    with pytest.raises(UserError, match="--recover-lr must be positive"):
        RecoverSettings(lr=0).validate()
    assert RecoverSettings(tokens=100, seq_len=32, batch=2).windows == 4  # whole steps


@pytest.fixture
def pair(tiny_model_dir):
    """The tiny model as teacher, and a student with noise on every decoder weight and 40% of
    each zeroed."""
    teacher = load_model(str(tiny_model_dir))
    with torch.no_grad():  # sharper next-token distributions than random weights give
        teacher.model.model.norm.weight.mul_(8.0)
    student = copy.deepcopy(teacher.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in student.model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    w = m.weight
                    cut = w.abs().flatten().kthvalue(int(0.4 * w.numel())).values
                    w.add_(torch.randn(w.shape, generator=g) * w.std() * 0.5).mul_(w.abs() > cut)
    ids, _ = training_windows(SETTINGS, teacher)
    return teacher, student, ids


def _kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def test_distillation_lowers_the_kl_and_keeps_the_zeros(pair):
    teacher, student, ids = pair
    held = ids[-2:]
    zeros = {n: (p == 0) for n, p in student.named_parameters() if p.ndim == 2 and "layers" in n}
    before = _kl(student, teacher.model, held)
    result = distill(student, teacher.model, ids, SETTINGS)
    after = _kl(student, teacher.model, held)
    assert after < 0.85 * before, (before, after)  # on windows it did not train on
    assert len(result.curve) == SETTINGS.steps and result.tokens == SETTINGS.windows * SETTINGS.seq_len
    assert result.masked_weights == sum(int(z.sum()) for z in zeros.values()) > 0
    for n, p in student.named_parameters():
        if n in zeros:
            assert bool((p[zeros[n]] == 0).all()), n
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight)
    assert not any(p.requires_grad for p in student.parameters())


def test_resume_after_an_interruption_gives_the_same_weights(pair, tmp_path):
    teacher, student, ids = pair
    whole = copy.deepcopy(student)
    distill(whole, teacher.model, ids, SETTINGS)
    parted = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        distill(parted, teacher.model, ids, SETTINGS, state_dir=tmp_path, stop=lambda step: step == 2)
    assert (tmp_path / "recover-state.pt").is_file()
    resumed = copy.deepcopy(student)  # a new process: the weights as pruned, then the state
    result = distill(resumed, teacher.model, ids, SETTINGS, state_dir=tmp_path, resume=True)
    assert result.resumed_from_step == 2 and len(result.curve) == SETTINGS.steps
    assert not (tmp_path / "recover-state.pt").exists()
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    other = RecoverSettings(**{**SETTINGS.__dict__, "lr": 1e-3})
    with pytest.raises(UserError, match="no saved recovery state"):
        distill(copy.deepcopy(student), teacher.model, ids, other, state_dir=tmp_path, resume=True)


def test_self_text_is_deterministic_and_cached(tiny_model_dir, tmp_path):
    teacher = load_model(str(tiny_model_dir))
    a = self_text(teacher, 300, seed=3, cache_dir=tmp_path)
    assert a.shape == (300,) and len(list(tmp_path.glob("self-text-*.json"))) == 1
    b = self_text(teacher, 300, seed=3)  # no cache: generated again
    assert torch.equal(a, b)
    assert not torch.equal(a, self_text(teacher, 300, seed=4))


def test_a_shorter_self_text_is_read_from_a_longer_cached_one(tiny_model_dir, tmp_path):
    """Generation runs in whole rounds from the seed, so a shorter text is a prefix of a longer
    one: a cached 300-token text serves a request for 100 tokens without generating."""
    teacher = load_model(str(tiny_model_dir))
    long = self_text(teacher, 300, seed=3, cache_dir=tmp_path)
    logged = []
    short = self_text(teacher, 100, seed=3, cache_dir=tmp_path, log=logged.append)
    assert torch.equal(short, long[:100]) and "from" in logged[0]
    assert torch.equal(short, self_text(teacher, 100, seed=3))  # what generating it gives
    assert len(list(tmp_path.glob("self-text-*.json"))) == 1


def test_cli_recover_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), *FAST, "--sparsity", "0.3", "--structured-fraction", "1",
                 "--target", "gguf", "--quant", "F32", "--recover", "--recover-tokens", "256",
                 "--recover-seq-len", "32", "--recover-batch", "2", "--recover-lr", "3e-3",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    assert rec["steps"] == 4 and rec["tokens"] == 256
    assert rec["text"] == "self (generated by the dense model)"  # the default
    ppl = report["perplexity"]
    # a random tiny model says nothing about quality: the figures are scored on the same windows
    counts = {ppl[k]["n_predicted"] for k in ("dense", "before_recovery", "pruned")}
    assert counts == {2 * 63}  # FAST: 2 windows of 64 tokens
    assert ppl["pruned"]["perplexity"] != ppl["before_recovery"]["perplexity"]  # training moved the weights
    assert "recovery (distillation)" in capsys.readouterr().out
    assert rec["device"] == "cpu" and rec["peak_rss_bytes"] > 0
    assert (out / "recovery.png").is_file() and "## Recovery" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recovery"]["steps"] == 4 and "curve" not in manifest["recovery"]
    assert "distilled from the dense model on 256 tokens" in (out / "README.md").read_text()
    assert report["memory"]["peak_rss_bytes"] >= report["memory"]["peak_rss_after_prune_bytes"]
    assert main(["verify", str(out)]) == 0


def test_cli_self_text_for_calibration_and_recovery(tiny_model_dir, tmp_path):
    """--calib-text self and --recover-text self: the model's own text, generated once before
    pruning and cached beside OUT, so a second run reads the same tokens."""
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--calib-samples", "4", "--calib-seq-len", "32",
            "--eval-windows", "2", "--eval-seq-len", "64", "--sparsity", "0.3",
            "--structured-fraction", "1", "--target", "none", "--calib-text", "self", "--recover",
            "--recover-text", "self", "--recover-tokens", "128", "--recover-seq-len", "32",
            "--recover-batch", "2", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    cached = sorted((tmp_path / ".out.recover").glob("self-text-*.json"))
    assert len(cached) == 1  # 4 x 32 calibration tokens = 2 steps x 2 windows x 32: one text
    first = json.loads((out / "report.json").read_text())
    assert main([*args, "--force"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["recovery"]["curve"] == first["recovery"]["curve"]
    assert again["recovery"]["text"].startswith("self")


def test_device_is_checked():
    from mosaic_export.model.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")


def test_cli_rejects_a_missing_device(tiny_model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    assert main(["--model", str(tiny_model_dir), *FAST, "--sparsity", "0.3", "--recover",
                 "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_resume_needs_recover(tiny_model_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_model_dir), *FAST, "--sparsity", "0.3", "--resume",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--resume continues a recovery: give --recover too" in capsys.readouterr().err


CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_frame_is_the_template_around_the_message(tiny_model_dir):
    from mosaic_export.method.self_text import ChatFrame

    tok = load_model(str(tiny_model_dir)).tokenizer
    assert ChatFrame.of(tok) is None  # no chat template: continuations only
    tok.chat_template = CHATML
    frame = ChatFrame.of(tok)
    assert tok.decode(frame.before) == "<|user|>" and tok.decode(frame.after) == "<|end|><|assistant|>"
    assert frame.end is None  # "<|end|>" is plain text here: the end of text ends a turn
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    frame = ChatFrame.of(tok)
    assert frame.end == tok.convert_tokens_to_ids("<|end|>") == frame.after[0]


def test_self_text_writes_user_turns_and_drops_probe_questions(tiny_model_dir):
    """With a chat template, half the prompts are user's turns the model writes itself, in the
    template; a message that is a chat-probe question (any case or punctuation) is dropped."""
    from mosaic_export.core.texts import BUILTIN, corpus
    from mosaic_export.method.self_text import ChatFrame, _Writer

    teacher = load_model(str(tiny_model_dir))
    teacher.tokenizer.chat_template = CHATML
    writer = _Writer(teacher, ChatFrame.of(teacher.tokenizer), corpus(BUILTIN), torch.device("cpu"))
    assert not writer.accept("what is the CAPITAL of France") and writer.dropped == 1
    assert not writer.accept("  ") and writer.dropped == 1
    assert writer.accept("Tell me about rivers.") and writer.messages == 1
    text = teacher.tokenizer.decode(self_text(teacher, 600, seed=1))
    assert "<|user|>" in text and "<|assistant|>" in text
    assert torch.equal(self_text(teacher, 600, seed=1), self_text(teacher, 600, seed=1))


def test_several_recovery_texts_share_the_windows_in_turn(tiny_model_dir):
    teacher = load_model(str(tiny_model_dir))
    mixed = RecoverSettings(tokens=5 * 32, seq_len=32, batch=5, text="self, builtin")
    ids, name = training_windows(mixed, teacher)
    assert ids.shape == (5, 32) and name == "self (generated by the dense model) + builtin"
    own, _ = training_windows(RecoverSettings(tokens=3 * 32, seq_len=32, batch=3, text="self"), teacher)
    builtin, _ = training_windows(RecoverSettings(tokens=2 * 32, seq_len=32, batch=2, text="builtin"),
                                  teacher)
    assert torch.equal(ids, torch.stack([own[0], builtin[0], own[1], builtin[1], own[2]]))
    with pytest.raises(UserError, match="no text source"):
        RecoverSettings(text=" , ").validate()
    with pytest.raises(UserError, match="a source twice"):
        RecoverSettings(text="self,self").validate()


def test_sampled_text_is_cut_at_its_first_stop_and_keeps_a_turn_end():
    from mosaic_export.method.self_text import _sample

    class Model:  # generate: the prompt, then four tokens
        def generate(self, ids, **kwargs):
            return torch.cat([ids, torch.tensor([[5, 7, 9, 3]])], dim=1)

    cpu = torch.device("cpu")
    assert _sample(Model(), [[1, 2]], 0, [3, 7], 4, cpu) == [[5]]
    assert _sample(Model(), [[1, 2]], 0, [3, 7], 4, cpu, keep=7) == [[5, 7]]  # a turn's end
    assert _sample(Model(), [[1, 2]], 0, [8], 4, cpu, keep=8) == [[5, 7, 9, 3]]  # no stop: all

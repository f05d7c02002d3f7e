"""Recovery: distil the pruned (resized and/or sparse) model from the dense one.

The dense model is the teacher, frozen; the pruned model is the student. On windows of text the
student learns the teacher's next-token distribution:

    loss = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))      per predicted token
         + hidden_weight * mean over layers of MSE(h_student, h_teacher)  (optional)

with AdamW, a linear warm-up then cosine decay of the learning rate, and gradient accumulation
(one window at a time, ``batch`` windows a step), so memory stays at the two models, the
optimizer state and one window's activations. Weights that unstructured pruning set to zero stay
zero: their gradients are masked and the weights re-masked after every step. The embedding table
(tied to the output layer in SmolLM2) is frozen; every decoder layer and the final norm learn.

Interrupting (Ctrl-C, SIGTERM) saves the state (student weights, optimizer, schedule, data
position, RNG) to ``state_dir``; ``resume`` continues it, to the same final weights as an
uninterrupted run with the same seed. The same seed gives the same data order and weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mosaic_export.core.errors import UserError
from mosaic_export.core.texts import SELF
from mosaic_export.measure.process import peak_rss_bytes, release_memory
from mosaic_export.method.distillation import kd_loss, lr_at, trainable, zero_masks
from mosaic_export.method.windows import source_windows
from mosaic_export.model.device import resolve_device
from mosaic_export.model.folder import LoadedModel
from mosaic_export.model.load import load_model

# Sized so that the default model (SmolLM2-135M, 30% removed) recovers in about ten minutes on
# 2 CPU cores (BENCHMARKS.md, "Recovery").
DEFAULT_TOKENS = 65_536
STATE_FILE = "recover-state.pt"


@dataclass(frozen=True)
class RecoverSettings:
    tokens: int = DEFAULT_TOKENS  # training tokens (windows x seq_len), rounded up to whole steps
    seq_len: int = 256
    batch: int = 4  # windows per optimizer step (accumulated one window at a time)
    lr: float = 1e-4
    warmup: float = 0.05  # share of the steps with a linearly rising learning rate
    temperature: float = 1.0
    hidden_weight: float = 0.0
    weight_decay: float = 0.0
    # "self": text the dense model generates (the default: the only text measured to bring the
    # chat behaviour back, BENCHMARKS.md "Recovery"); or like --calib-text: builtin, a file; or
    # several of these, comma-separated, sharing the windows evenly
    text: str = "self"
    seed: int = 0

    @property
    def sources(self) -> list[str]:
        """The text sources, in order: ``text`` split at commas."""
        return [t.strip() for t in self.text.split(",") if t.strip()]

    def validate(self) -> RecoverSettings:
        checks = [(self.tokens >= self.seq_len, f"--recover-tokens must be at least one window "
                                                f"({self.seq_len} tokens), got {self.tokens}"),
                  (self.seq_len >= 2, f"--recover-seq-len must be at least 2, got {self.seq_len}"),
                  (self.batch >= 1, f"--recover-batch must be at least 1, got {self.batch}"),
                  (self.lr > 0, f"--recover-lr must be positive, got {self.lr}"),
                  (0 <= self.warmup < 1, f"warm-up must be in [0, 1), got {self.warmup}"),
                  (self.temperature > 0, f"--recover-temperature must be positive, got "
                                         f"{self.temperature}"),
                  (bool(self.sources), "--recover-text names no text source"),
                  (len(set(self.sources)) == len(self.sources),
                   f"--recover-text names a source twice: {self.text}"),
                  (self.hidden_weight >= 0, f"the hidden-state weight must be >= 0, got "
                                            f"{self.hidden_weight}")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    @property
    def windows(self) -> int:
        """Windows seen: the token budget in whole steps."""
        steps = math.ceil(self.tokens / (self.seq_len * self.batch))
        return steps * self.batch

    @property
    def steps(self) -> int:
        return self.windows // self.batch


def data_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


@dataclass
class RecoverResult:
    settings: dict
    steps: int
    windows: int
    tokens: int
    seconds: float
    first_loss: float
    final_loss: float
    curve: list[dict] = field(default_factory=list)  # per step: tokens, loss, lr
    resumed_from_step: int | None = None
    masked_weights: int = 0  # weights kept at zero
    device: str = "cpu"
    peak_rss_bytes: int = 0  # this process's peak resident set up to the end of training
    peak_device_bytes: int | None = None  # CUDA: the most memory torch allocated on the GPU

    def to_dict(self) -> dict:
        return asdict(self)


def _forward(model: nn.Module, ids: torch.Tensor, hidden: bool):
    out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    return out.logits, (out.hidden_states if hidden else None)


def _prepare(student: nn.Module, teacher: nn.Module) -> tuple[list[nn.Parameter], dict]:
    """Freeze the teacher and the student's embedding; the student's trainable parameters and
    the masks that keep unstructured pruning's zeros at zero."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = trainable(student)
    params_set = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in params_set)
    return params, zero_masks(params)


def window_loss(student: nn.Module, teacher: nn.Module, window: torch.Tensor,
                settings: RecoverSettings) -> torch.Tensor:
    """The distillation loss on one window (1, seq_len): KL of the next-token distributions,
    plus the hidden-state term when settings.hidden_weight > 0."""
    hidden = settings.hidden_weight > 0
    with torch.no_grad():
        t_logits, t_hidden = _forward(teacher, window, hidden)
    s_logits, s_hidden = _forward(student, window, hidden)
    loss = kd_loss(s_logits[:, :-1], t_logits[:, :-1], settings.temperature)
    if hidden:
        layers = list(zip(s_hidden[1:], t_hidden[1:], strict=True))
        loss = loss + settings.hidden_weight * sum(F.mse_loss(a, b) for a, b in layers) / len(layers)
    return loss


def _masked_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], masks: dict) -> None:
    """One optimizer step that leaves masked (pruned) weights at zero: their gradients are
    zeroed before it, the weights re-masked after (AdamW's decay would move them)."""
    for p in params:
        if id(p) in masks and p.grad is not None:
            p.grad.mul_(masks[id(p)])
    optimizer.step()
    with torch.no_grad():
        for p in params:
            if id(p) in masks:
                p.mul_(masks[id(p)])


def distill(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, settings: RecoverSettings,
            state_dir: Path | None = None, resume: bool = False,
            stop: Callable[[int], bool] | None = None, device: str | None = "cpu") -> RecoverResult:
    """Train ``student`` in place on windows ``ids`` (n_windows, seq_len) to match ``teacher``.

    ``state_dir``: where an interrupted run saves its state (and, with ``resume``, where it is
    read). ``stop(step)``: called after each step, True to interrupt there as Ctrl-C would (tests).
    ``device``: where both models train (``auto``: CUDA when there is one); the student comes
    back to the CPU at the end, the teacher too.
    """
    settings.validate()
    if ids.shape[0] < settings.windows:
        raise UserError(f"recovery needs {settings.windows} windows of {settings.seq_len} tokens, "
                        f"got {ids.shape[0]}")
    ids = ids[:settings.windows]
    torch.manual_seed(settings.seed)
    dev = _to_device(resolve_device(device), student, teacher)
    params, masks = _prepare(student, teacher)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    digest = data_digest(ids)
    start, curve, seconds = 0, [], 0.0
    resumed = None
    if resume:
        start, curve, seconds = _resume(state_dir, settings, digest, student, optimizer)
        resumed = start
    student.train()
    t0 = time.perf_counter() - seconds
    bar = tqdm(total=settings.steps, initial=start, desc="recover", unit="step", leave=False)
    try:
        for step in range(start, settings.steps):
            lr = lr_at(step, settings.steps, settings.lr, settings.warmup)
            batch = ids[step * settings.batch:(step + 1) * settings.batch].to(dev)  # (batch, seq_len)
            total = _train_step(student, teacher, batch, settings, optimizer, lr, params, masks)
            done = (step + 1) * settings.batch * settings.seq_len
            curve.append({"step": step + 1, "tokens": done, "loss": total, "lr": lr})
            trained = done - start * settings.batch * settings.seq_len  # this session's tokens
            rate = trained / max(time.perf_counter() - t0 - seconds, 1e-9)
            bar.set_postfix(loss=f"{total:.3f}", tokens_per_s=f"{rate:.0f}")
            bar.update(1)
            if stop is not None and stop(step + 1):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if state_dir is not None:
            # the steps done are the curve's (a resumed run's curve starts with the earlier ones)
            _save_state(state_dir, settings, digest, student, optimizer, len(curve), curve,
                        time.perf_counter() - t0)
        raise
    finally:
        bar.close()
        _frozen_on_cpu(student, teacher)
    if state_dir is not None:
        (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return RecoverResult(asdict(settings), settings.steps, settings.windows,
                         settings.windows * settings.seq_len, time.perf_counter() - t0,
                         curve[0]["loss"] if curve else float("nan"),
                         curve[-1]["loss"] if curve else float("nan"), curve, resumed,
                         sum(int((~m).sum()) for m in masks.values()), str(dev), peak_rss_bytes(),
                         torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)


def _to_device(dev: torch.device, student: nn.Module, teacher: nn.Module) -> torch.device:
    student.to(dev)
    teacher.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return dev


def _frozen_on_cpu(student: nn.Module, teacher: nn.Module) -> None:
    """After training (or its interruption): the student in eval mode without gradients, both on
    the CPU."""
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    student.to("cpu")
    teacher.to("cpu")


def _train_step(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, settings: RecoverSettings,
                optimizer: torch.optim.Optimizer, lr: float, params: list[nn.Parameter],
                masks: dict) -> float:
    """One optimizer step at learning rate lr, the batch's windows accumulated one at a time
    (memory of one window); the mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for window in batch:
        loss = window_loss(student, teacher, window[None], settings)  # (1, seq_len)
        (loss / settings.batch).backward()
        total += float(loss.detach()) / settings.batch
    _masked_step(optimizer, params, masks)
    return total


def _resume(state_dir: Path | None, settings: RecoverSettings, digest: str, student: nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, list, float]:
    """An interrupted run's state restored: (its step, its curve, its seconds)."""
    state = _load_state(state_dir, settings, digest)
    student.load_state_dict(state["student"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["curve"], state["seconds"]


def _fingerprint(settings: RecoverSettings, digest: str) -> str:
    return json.dumps({"settings": asdict(settings), "data": digest}, sort_keys=True)


def _save_state(state_dir: Path, settings: RecoverSettings, digest: str, student: nn.Module,
                optimizer: torch.optim.Optimizer, step: int, curve: list[dict], seconds: float) -> None:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{STATE_FILE}.tmp"
    torch.save({"fingerprint": _fingerprint(settings, digest), "student": student.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": step,
                "curve": curve, "seconds": seconds}, tmp)
    tmp.replace(state_dir / STATE_FILE)


def _load_state(state_dir: Path | None, settings: RecoverSettings, digest: str) -> dict:
    path = Path(state_dir or ".") / STATE_FILE
    if state_dir is None or not path.is_file():
        raise UserError(f"--resume: no saved recovery state in {state_dir}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"--resume: {path} cannot be read ({type(e).__name__}: {e})") from None
    if state.get("fingerprint") != _fingerprint(settings, digest):
        raise UserError(f"--resume: {path} was saved by a run with other recovery settings or data")
    return state


# --- training text ------------------------------------------------------------------------------

def training_windows(settings: RecoverSettings, teacher, cache_dir: Path | None = None,
                     log=print, device: str | None = "cpu") -> tuple[torch.Tensor, str]:
    """(settings.windows, seq_len) token ids to distil on, and a description of their source:
    random windows (seeded) of a text source, or of text the teacher generates (``self``). With
    several sources (comma-separated), the windows are shared out evenly (the first sources
    take the remainder) and taken in turn; a source left without a window is said."""
    sources = settings.sources
    parts, names = [], []
    for k, source in enumerate(sources):
        n = settings.windows // len(sources) + (k < settings.windows % len(sources))
        if n == 0:
            log(f"recovery text: {source} gets none of the {settings.windows} windows")
            continue
        parts.append(source_windows(teacher, source, n, settings.seq_len, settings.seed, cache_dir, log,
                                    device))
        names.append("self (generated by the dense model)" if source == SELF else source)
    rows = [part[i] for i in range(len(parts[0])) for part in parts if i < len(part)]
    return torch.stack(rows), " + ".join(names)


def recovery_state_dir(out: Path) -> Path:
    """Where an interrupted recovery keeps its state: beside OUT, not inside its temporary
    folder (which an interruption removes)."""
    out = out.resolve()
    return out.parent / f".{out.name}.recover"


def recover_model(settings: RecoverSettings, model: str | None, out: Path, loaded: LoadedModel,
                  resume: bool = False, device: str | None = "cpu", log=print) -> dict:
    """Distil the pruned model in place from the dense one (``model``, loaded again as the
    teacher); the state of an interrupted recovery is kept beside ``out``."""
    log(f"recovering: distilling from the dense model on {settings.windows} windows of "
        f"{settings.seq_len} tokens of {settings.text} ({settings.steps} steps)")
    teacher = load_model(model)
    t0 = time.perf_counter()
    state_dir = recovery_state_dir(out)
    ids, source = training_windows(settings, teacher, state_dir, log, device)
    text_s = time.perf_counter() - t0  # self text: the generation (or the cache read)
    result = distill(loaded.model, teacher.model, ids, settings, state_dir, resume,
                     device=device)
    del teacher
    release_memory()
    log(f"recovered in {result.seconds:.0f} s: distillation loss {result.first_loss:.3f} -> "
        f"{result.final_loss:.3f}")
    return {**result.to_dict(), "text": source, "text_seconds": text_s}

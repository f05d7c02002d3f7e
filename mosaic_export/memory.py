"""What a streamed run holds in memory, and the door --max-rss keeps (issue 15).

A streamed run (weights.py) holds, beyond what is resident once the model is opened (the
interpreter, torch, the embedding, final norm and output layer, the tokenizer): one decoder layer
in float32, twice while it is resized (the new tensors made before the old ones go); the input
statistics of its projections (a Gram matrix of each input group where a method needs one:
SparseGPT, compensation, the error ladder; SparseGPT's inverse factor of the largest beside it);
the calibration hidden states, the inputs and the outputs of the layer at work; the perplexity
windows' hidden states the same way; and the activations of one batch inside a layer (the MLP's
channels, the attention scores). ``run_needs`` adds these up from the model's sizes; the
estimate is checked against measured runs in BENCHMARKS.md.
"""

from __future__ import annotations

from .errors import UserError
from .process import proc_bytes
from .units import format_bytes

FLOAT = 4


def resident_bytes() -> int:
    """This process's resident set now (VmRSS); 0 where /proc is missing."""
    return proc_bytes("/proc/self/status", "VmRSS") or 0


def run_needs(loaded, settings, config) -> dict[str, int]:
    """Bytes a streamed run needs at its peak, by part (see the module's docstring)."""
    shape = loaded.shape
    layer = shape.layer_params(shape.dense_dims) * FLOAT
    inputs = {"attention": shape.hidden, "o": shape.n_head * shape.head_dim, "mlp": shape.hidden,
              "down": shape.n_ff}
    grams = sum(n * n for n in inputs.values()) * FLOAT
    gram_work = max(inputs.values()) ** 2 * FLOAT * 2  # SparseGPT's inverse and its factor
    c = settings.calibration
    per_batch = config.calib_batch_size * c.seq_len
    calibration = 2 * c.n_samples * c.seq_len * shape.hidden * FLOAT
    inside = per_batch * (3 * shape.n_ff + 4 * shape.hidden) * FLOAT \
        + config.calib_batch_size * shape.n_head * c.seq_len ** 2 * FLOAT
    windows = config.eval_windows if config.eval_windows is not None else 64
    evaluation = 2 * windows * config.eval_seq_len * shape.hidden * FLOAT + 2 * 128 * shape.vocab * FLOAT
    return {"resident once opened": resident_bytes(), "one layer, twice while resized": 2 * layer,
            "input statistics": grams + gram_work, "calibration hidden states": calibration,
            "activations of one batch": inside, "perplexity hidden states and logits": evaluation}


def check_max_rss(config, loaded, settings) -> None:
    """Refuse, before any work, a --max-rss below what the run needs (with the figure)."""
    parts = run_needs(loaded, settings, config)
    need = sum(parts.values())
    if need > config.max_rss:
        detail = "; ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
        raise UserError(f"--max-rss {format_bytes(config.max_rss)} is less than this run needs, about "
                        f"{format_bytes(need)} ({detail})")

"""What a streamed run holds in memory, and the door --max-rss keeps (issue 15).

A streamed run (weights.py) holds what is resident once the model is opened (the interpreter,
torch, the tokenizer, the final norm) and, on top, the largest of what its phases hold at once:

- a calibration pass over a layer: the layer in float32, twice while it is resized (the new
  tensors made before the old ones go); the input statistics of its projections (a Gram matrix
  of each input group, where a method needs one) and the largest solve beside them
  (compensation's float64 system); one batch of the calibration hidden states, in and out (the
  others on disk: calibration.SpilledStates); the activations of that batch inside the layer
  (the MLP's channels, the attention scores);
- embedding the calibration samples: the embedding's rows of the ids they use, and a chunk of
  the table read (weights.table_chunks);
- scoring perplexity: a chunk of the output table's rows, the logits of a chunk of positions
  against it, a window's hidden states, and the running sums of every predicted position;
- writing a table (the checkpoint's, the GGUF file's, the ONNX data's): a chunk of its rows at a
  time;
- exporting a layer (GGUF, ONNX): the layer in float32, and two copies of its largest matrix
  (ONNX packs q, k and v side by side, then stores the transpose);
- checking parity with a runtime (not for ``--target none``): PyTorch's logits over the parity
  window (a calibration sample) and the runtime's, read back from its child process.

``run_needs`` adds these up from the model's sizes; BENCHMARKS.md compares the estimate with
measured runs.
"""

from __future__ import annotations

from .errors import UserError
from .process import proc_bytes
from .units import format_bytes

FLOAT = 4


def resident_bytes() -> int:
    """This process's resident set now (VmRSS); 0 where /proc is missing."""
    return proc_bytes("/proc/self/status", "VmRSS") or 0


def run_needs(loaded, settings, config, windows: int) -> dict[str, int]:
    """Bytes a streamed run needs at its peak: resident once opened, and each phase's own (see
    the module's docstring); the need is the first plus the largest of the others."""
    from .calibration import first_of_kinds
    from .weights import TABLE_CHUNK, chunk_rows

    shape = loaded.shape
    layer = shape.layer_params(shape.dense_dims) * FLOAT
    inputs = {"attention": shape.hidden, "o": shape.n_head * shape.head_dim, "mlp": shape.hidden,
              "down": shape.n_ff}
    widest = max(inputs.values())
    # the float32 Gram matrices; beside them the largest solve: least-squares compensation's kept
    # rows and H[K, K] with its factor in float64 (prune.structured.compensate), more than
    # SparseGPT's float32 inverse
    grams = sum(n * n for n in inputs.values()) * FLOAT + 2 * widest * (widest + shape.hidden) * 8
    c, batch = settings.calibration, config.calib_batch_size
    states = 2 * batch * c.seq_len * shape.hidden * FLOAT
    inside = batch * c.seq_len * (3 * shape.n_ff + 4 * shape.hidden + shape.n_head * c.seq_len) * FLOAT
    used = min(shape.vocab, c.n_samples * c.seq_len) * shape.hidden * FLOAT
    # the layers before the first of the last kind, held to reach it (Gemma 3: 5), and their work
    before = first_of_kinds(loaded.spec.layer_list(loaded.model))[-1]
    catch = used + TABLE_CHUNK + (before * layer + inside if before else 0)
    rows = chunk_rows(shape.hidden)
    positions = windows * config.eval_seq_len
    scoring = (TABLE_CHUNK + 3 * 128 * rows * FLOAT + config.eval_seq_len * shape.hidden * FLOAT
               + positions * (FLOAT + 8 + FLOAT + 8) + min(shape.vocab, positions) * shape.hidden * FLOAT)
    return {"resident once opened": resident_bytes(),
            "a calibration pass over one layer": 2 * layer + grams + states + inside,
            "embedding the calibration samples": catch,
            "scoring perplexity": scoring if windows else 0,
            "writing a table": 2 * TABLE_CHUNK,
            "checking parity": 0 if config.target is None else 2 * c.seq_len * shape.vocab * FLOAT,
            "exporting a layer": layer + 2 * max(shape.n_ff, (shape.n_head + 2 * shape.n_kv) * shape.head_dim)
            * shape.hidden * FLOAT}


def check_max_rss(config, loaded, settings, windows: int) -> int:
    """The bytes the run needs (``windows``: the perplexity windows); refused, before any work,
    when --max-rss is less (with the figure)."""
    parts = run_needs(loaded, settings, config, windows)
    need = parts["resident once opened"] + max(v for k, v in parts.items() if k != "resident once opened")
    if config.max_rss is not None and need > config.max_rss:
        detail = "; ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
        raise UserError(f"--max-rss {format_bytes(config.max_rss)} is less than this run needs, about "
                        f"{format_bytes(need)} (resident once opened, and the largest phase: {detail})")
    return need

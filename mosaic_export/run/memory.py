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

``run_needs`` adds these up from the model's sizes, and ``check_max_rss`` takes the largest
phase on top of what is resident once opened; BENCHMARKS.md compares the estimate with measured
runs. Beside them it counts what is outside this process, since --max-rss holds the whole
process tree (measure/tree.py):

- a runtime child beside this process (the export's parity check and the rounds that measure
  it): the dense model's predicted peak in the format (the pruned one is smaller) with the
  parity window's logits twice (the runtime's, and ours read back), MARGIN more for the cost
  model's error; beside it this process holds its resident set and our logits;
- a GGUF source read directly (no converted copy in the cache): its file mapped, page by page;
- without --max-rss (no buffer mapped on its own), the heap's fragmentation: up to the largest
  phase again (measured: 565.5 MiB against 493.4 estimated for the phases alone, SmolLM2 streamed).

Each estimate also carries SLACK (the interpreter's and the allocator's own growth, which no
phase names).
"""

from __future__ import annotations

from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes
from mosaic_export.measure.process import peak_rss_bytes, proc_bytes
from mosaic_export.method.calibration import first_of_kinds
from mosaic_export.model.weights import TABLE_CHUNK, chunk_rows

FLOAT = 4
MARGIN = 0.1  # a runtime child's predicted peak, raised by this share for the cost model's error
SLACK = 0.05  # every estimate raised by this share


def resident_bytes() -> int:
    """This process's resident set now (VmRSS); 0 where /proc is missing."""
    return proc_bytes("/proc/self/status", "VmRSS") or 0


def run_needs(loaded, settings, config, windows: int) -> dict[str, int]:
    """Bytes a streamed run needs at its peak: resident once opened, and each phase's own (see
    the module's docstring); the need is the first plus the largest of the others."""

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


def runtime_need(config, loaded, settings, pricing) -> dict[str, int]:
    """Bytes held beside this process's phases while a runtime child runs (see the module's
    docstring): the child's, and this process's logits for the parity check. Nothing for
    --target none."""
    if config.target is None or pricing is None:
        return {}
    shape = loaded.shape
    logits = settings.calibration.seq_len * shape.vocab * FLOAT
    child = pricing.cost([shape.dense_dims] * shape.n_layers).memory_bytes
    return {"a runtime child": int(child * (1 + MARGIN)) + 2 * logits, "our parity logits": logits}


def estimate(config, loaded, settings, windows: int, pricing=None) -> tuple[int, dict[str, int]]:
    """The peak the process tree of this run may reach: what is resident once opened (or the
    high-water mark so far, when higher), and the larger of the largest phase (fragmentation
    included without --max-rss) and a runtime child with what this process holds beside it; a
    GGUF source's mapped file on top, and SLACK. Returns (the bytes, the parts)."""
    parts = run_needs(loaded, settings, config, windows)
    resident = max(parts.pop("resident once opened"), peak_rss_bytes())
    largest = max(parts.values())
    if config.max_rss is None:  # large buffers served from the heap, which fragments
        parts["heap fragmentation (no --max-rss)"] = largest
    child = runtime_need(config, loaded, settings, pricing)
    source = getattr(loaded.weights, "source", None)
    mapped = loaded.gguf_file.stat().st_size if type(source).__name__ == "GGUFSource" else 0
    own = largest + parts.get("heap fragmentation (no --max-rss)", 0)
    need = (resident + max(own, sum(child.values())) + mapped) * (1 + SLACK)
    return int(need), {"resident once opened": resident, **parts, **child,
                       **({"the GGUF source, mapped": mapped} if mapped else {})}


def check_max_rss(config, loaded, settings, windows: int, pricing=None) -> int:
    """The bytes the run's process tree needs (``windows``: the perplexity windows); refused,
    before any work, when --max-rss is less (with the figure)."""
    need, parts = estimate(config, loaded, settings, windows, pricing)
    if config.max_rss is not None and need > config.max_rss:
        detail = "; ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
        raise UserError(f"--max-rss {format_bytes(config.max_rss)} is less than this run needs, about "
                        f"{format_bytes(need)} (this process and its runtime children: {detail})")
    return need

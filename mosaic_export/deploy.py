"""Deployable output for on-device apps: OUT/manifest.json, OUT/README.md, verify and run.

The manifest lists every file of OUT with its sha256 and size, the format (target, GGUF type or
ONNX dtype, the runtime file), each layer's sizes, the profile and budgets, predicted and
measured figures, the token ids and figures of the parity check, and the versions of the tool and
its runtimes. No timestamps: the same inputs give the same bytes.

``verify(OUT)`` re-hashes every file (and refuses files the manifest does not list) and re-runs
the parity check of the build: the runtime file against the PyTorch checkpoint in OUT/model on
the recorded token ids. ``generate(OUT, prompt)`` runs the target runtime, greedy.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import UserError
from .units import format_bytes

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PACKAGES = ("torch", "transformers", "numpy", "gguf", "llama-cpp-python", "onnx", "onnxruntime",
            "tokenizers")
MIN_FLOAT_AGREEMENT = 0.95  # as at build time (targets.gguf.MIN_FLOAT_AGREEMENT)
AGREEMENT_SLACK = 0.01  # verify may not agree less than the build did, beyond this


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    """Every file under folder but the manifest itself: relative path -> sha256 and size."""
    return {p.relative_to(folder).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST}


def runtime_format(report: dict) -> dict:
    """Which runtime file OUT holds, from the report of the build."""
    if "gguf" in report:
        g = report["gguf"]
        return {"target": "gguf", "quant": g["type"], "arch": g["arch"], "model_path": g["file"]}
    if "onnx" in report:
        o = report["onnx"]
        return {"target": "onnx", "dtype": o["dtype"], "opset": o["opset"],
                "model_path": f"{o['folder']}/model.onnx"}
    return {"target": None, "model_path": "model"}


def versions() -> dict:
    out = {"mosaic-export": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def app_readme(report: dict, fmt: dict) -> str:
    """A short README for the app developer."""
    layers = report.get("layers", [])
    sizes = sorted({(d["n_head"], d["n_kv"], d["n_ff"]) for d in layers})
    path = fmt["model_path"]
    lines = [f"# {Path(report['model']['source']).stem}, pruned by mosaic-export", "",
             f"Built for profile `{report['profile']['name']}` ({report['profile']['description']}). "
             f"{len(layers)} decoder layers; per-layer (heads, KV heads, MLP channels): "
             + ", ".join(f"({h}, {kv}, {ff})" for h, kv, ff in sizes[:6])
             + (" ..." if len(sizes) > 6 else "") + ".", ""]
    cost = report.get("cost")
    if cost:
        p, m = cost["predicted"], cost.get("measured")
        lines += ["| figure | predicted | measured on the build machine |", "|---|---|---|",
                  f"| peak memory, {p['context']} tokens of context | {format_bytes(p['memory_bytes'])} | "
                  + (format_bytes(m["memory_bytes"]) if m else "-") + " |",
                  f"| decode tokens/s | {p['decode_tokens_per_s']:.1f} | "
                  + (f"{m['decode_tokens_per_s']:.1f}" if m else "-") + " |", ""]
    if fmt["target"] == "gguf":
        lines += ["## Run it", "", f"`{path}` is a GGUF file for stock llama.cpp (arch "
                  f"`{fmt['arch']}`, type {fmt['quant']}; tokenizer and chat template inside):", "",
                  "    llama-cli -m " + path + " -cnv", "", "From Python (llama-cpp-python):", "",
                  "```python", "from llama_cpp import Llama",
                  f'llm = Llama(model_path="{path}", n_ctx=2048)',
                  'print(llm.create_chat_completion([{"role": "user", "content": "Hello"}], '
                  'temperature=0)["choices"][0]["message"]["content"])', "```", ""]
    elif fmt["target"] == "onnx":
        folder = path.split("/")[0]
        lines += ["## Run it", "", f"`{folder}/` holds `model.onnx` (weights in `model.onnx.data`), "
                  "the tokenizer files and `model_config.json` (per-layer sizes, eos ids, chat "
                  "template). One graph serves prefill and decode:", "",
                  "    inputs   input_ids, attention_mask, position_ids (int64),",
                  "             past_key_values.{i}.key / .value:",
                  "                 (batch, layer i's KV heads, past, head_dim)",
                  "    outputs  logits, present.{i}.key / .value", "",
                  "```python", "from mosaic_export.targets.onnx_runner import OnnxDecoder",
                  f'dec = OnnxDecoder("{folder}")', "tok = dec.tokenizer()",
                  'print(tok.decode(dec.generate(tok.encode("Hello").ids, 32, stop_at_eos=True)))',
                  "```", ""]
    lines += ["## Check it", "",
              "    mosaic-export run . --prompt \"Hello\"   # generate with the runtime",
              "    mosaic-export verify .                   # checksums of every file, and parity", "",
              "`model/` is the resized PyTorch checkpoint (load it with "
              "`mosaic_export.model_io.load_model`); "
              "`plan.json`, `report.json`, `report.md` say how it was made and measured; "
              "`manifest.json` lists every file with its sha256.", ""]
    return "\n".join(lines)


def finalize(folder: Path, report: dict, parity_ids: list[int]) -> dict:
    """Write OUT/README.md, then OUT/manifest.json over every file (README included)."""
    fmt = runtime_format(report)
    (folder / "README.md").write_text(app_readme(report, fmt), encoding="utf-8")
    target = fmt["target"]
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "layers": report.get("layers", []),
        "profile": report["profile"],
        "budgets": report.get("budgets"),
        "cost": report.get("cost"),
        "parity": {"ids": parity_ids, **(report[target]["parity"] if target else {})},
        "versions": versions(),
        "files": file_table(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                   encoding="utf-8")
    return manifest


def load_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such output folder")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: no {MANIFEST} (not an output folder of mosaic-export)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}/{MANIFEST}: cannot be read: {e}") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise UserError(f"{folder}/{MANIFEST}: version {manifest.get('manifest_version')} is not "
                        f"supported (expected {MANIFEST_VERSION})")
    return manifest


def verify(folder: Path, threads: int | None = None, log=print) -> dict:
    """Checksums of every file, then the build's parity check again; UserError on the first
    failure."""
    import torch

    from .model_io import load_model

    manifest = load_manifest(folder)
    listed = manifest["files"]
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"verify: {name} is missing")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise UserError(f"verify: {name} has changed (sha256 differs from the manifest)")
    extra = sorted(set(file_table(folder)) - set(listed))
    if extra:
        raise UserError(f"verify: {extra[0]} is not in the manifest")
    log(f"checksums: {len(listed)} files match the manifest")
    fmt, recorded = manifest["format"], manifest["parity"]
    result = {"files": len(listed)}
    if fmt["target"] is None:
        return result
    loaded = load_model(str(folder / "model"))
    ids = torch.tensor(recorded["ids"], dtype=torch.long)
    if fmt["target"] == "gguf":
        from .targets.gguf import FLOAT_TYPES
        from .targets.gguf_runner import next_token_agreement

        parity = next_token_agreement(loaded.model, folder / fmt["model_path"], ids, threads)
        floor = MIN_FLOAT_AGREEMENT if fmt["quant"] in FLOAT_TYPES else 0.0
    else:
        from .targets.onnx import MAX_FP32_LOGIT_DIFF, MIN_AGREEMENT
        from .targets.onnx import parity as onnx_parity

        parity = onnx_parity(loaded, folder / Path(fmt["model_path"]).parent, ids, gen_tokens=8,
                             threads=threads)
        floor = MIN_AGREEMENT
        if fmt["dtype"] == "fp32" and not parity["max_abs_logit_diff"] <= MAX_FP32_LOGIT_DIFF:
            raise UserError(f"verify: max |logit difference| to PyTorch "
                            f"{parity['max_abs_logit_diff']:.2e} > {MAX_FP32_LOGIT_DIFF:g}")
    floor = max(floor, recorded["top1_agreement"] - AGREEMENT_SLACK)
    if not parity["top1_agreement"] >= floor:
        raise UserError(f"verify: greedy next-token agreement with PyTorch "
                        f"{parity['top1_agreement']:.1%} < {floor:.1%} (at build: "
                        f"{recorded['top1_agreement']:.1%})")
    log(f"parity: {fmt['model_path']} agrees with PyTorch on the greedy next token at "
        f"{parity['top1_agreement']:.1%} of {parity['positions']} positions "
        f"(at build: {recorded['top1_agreement']:.1%})")
    return {**result, "parity": parity}


def generate(folder: Path, prompt: str, max_tokens: int = 64, chat: bool = True,
             threads: int | None = None) -> str:
    """Greedy generation with the target runtime (the chat template when the model has one)."""
    manifest = load_manifest(folder)
    fmt = manifest["format"]
    if fmt["target"] is None:
        raise UserError(f"{folder} holds only the PyTorch checkpoint (built with --target none): "
                        "nothing to run in a runtime")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    if fmt["target"] == "gguf":
        from .targets.gguf_runner import _llama

        llm = _llama(folder / fmt["model_path"], 2048, threads, logits_all=False)
        if chat and llm.metadata.get("tokenizer.chat_template"):
            out = llm.create_chat_completion([{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0.0)
            return out["choices"][0]["message"]["content"]
        return llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    from transformers import AutoTokenizer

    from .targets.onnx_runner import OnnxDecoder

    onnx_folder = folder / Path(fmt["model_path"]).parent
    decoder = OnnxDecoder(onnx_folder, threads=threads)
    tok = AutoTokenizer.from_pretrained(onnx_folder)
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = decoder.generate(list(ids), max_tokens, stop_at_eos=True)
    if out and out[-1] in decoder.config["eos_token_ids"]:
        out = out[:-1]
    return tok.decode(out)

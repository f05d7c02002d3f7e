"""The ONNX target: folders for ONNX Runtime, as the registry sees it. Its constants are in
table.py; the writer (writer.py, graph.py: torch and onnx) and the runner (onnxruntime) load when a
method needs them, so that the registry stays light."""

from __future__ import annotations

import math
from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes
from mosaic_export.targets.base import Target
from mosaic_export.targets.onnx.table import (
    BITS,
    DTYPES,
    EMBED,
    GATHERS,
    MAX_FP32_LOGIT_DIFF,
    MIN_AGREEMENT,
    MODEL_FILE,
    NBITS_BLOCK,
    OUTER_BITS,
    OUTPUT,
    PROVIDERS,
)


class ONNX(Target):
    name = "onnx"
    engine = "ONNX Runtime"
    option = "dtype"
    noun = "ONNX dtype"
    types = DTYPES
    search_types = DTYPES
    default_type = "fp32"
    profile_keys = {"execution_provider": PROVIDERS}
    packages = ("onnx", "onnxruntime")
    nominal_base = 96 * 2**20
    streams = True

    def kv_bytes_per_value(self, type_: str) -> int:
        return 2 if type_ == "fp16" else 4  # the graph's activation dtype

    def tensor_bytes(self, name: str, rows: int, cols: int, type_: str, matmul: bool,
                     tensor_types: dict[str, str] | None) -> int:
        n = rows * cols
        if type_ == "fp16":  # norms too (computed in float32)
            return 2 * n
        if type_ in BITS and (matmul or name == EMBED):  # packed weights + a float32 scale a block
            bits = OUTER_BITS if name in (EMBED, OUTPUT) else BITS[type_]
            return rows * -(-cols // NBITS_BLOCK) * (NBITS_BLOCK * bits // 8 + 4)
        return 4 * n

    def tied_output_bytes(self, rows: int, cols: int, type_: str) -> int:
        return 0  # one table: int types gather from the output matrix, float ones multiply by the table

    def keeps_kv_heads(self, type_: str) -> bool:
        return True  # ONNX Runtime GenAI sizes one KV cache shape for every layer

    def check_exportable(self, loaded) -> None:
        from mosaic_export.targets.onnx.writer import check_exportable

        check_exportable(loaded)

    def artifact_name(self, type_: str) -> str:
        return f"onnx-{type_}"

    def export(self, loaded, path: Path, type_: str) -> None:
        from mosaic_export.targets.onnx.writer import export

        export(loaded, path, type_)

    def benchmark(self, path: Path, **options) -> dict:
        return _runner().benchmark(path, **options)

    def measure_options(self, runtime) -> dict:
        wanted = runtime.execution_provider if runtime is not None and runtime.target == self.name else None
        return {"provider": _runner().available_provider(wanted)}

    def deploy(self, loaded, path: Path, type_: str, parity_ids, runtime, evaluation, log) -> dict:
        from mosaic_export.targets.onnx.writer import deploy

        wanted = runtime.execution_provider if runtime.target == self.name else None
        if wanted and _runner().available_provider(wanted) != wanted:
            log(f"ONNX Runtime here has no {wanted}; benchmarking on {_runner().available_provider(wanted)}")
        log(f"exporting ONNX {type_} and checking it in ONNX Runtime")
        return deploy(loaded, path, type_, parity_ids, evaluation, provider=wanted)

    def manifest_format(self, section: dict) -> dict:
        return {"dtype": section["dtype"], "opset": section.get("opset"),
                "model_path": f"{section['folder']}/{MODEL_FILE}", "genai": section.get("genai", False)}

    def verify_parity(self, loaded, path: Path, fmt: dict, ids, recorded: dict,
                      threads: int | None) -> tuple[dict, float]:
        from mosaic_export.targets.onnx.writer import parity

        result = parity(loaded, path.parent, ids, threads=threads)
        if fmt["dtype"] == "fp32" and not result["max_abs_logit_diff"] <= MAX_FP32_LOGIT_DIFF:
            raise UserError(f"verify: {fmt['model_path']}: max |logit difference| to PyTorch "
                            f"{result['max_abs_logit_diff']:.2e} > {MAX_FP32_LOGIT_DIFF:g}")
        return result, MIN_AGREEMENT[fmt["dtype"]]

    def generate(self, path: Path, prompt: str, max_tokens: int, chat: bool, threads: int | None) -> str:
        from transformers import AutoTokenizer

        decoder = _runner().OnnxDecoder(path.parent, threads=threads)
        tok = AutoTokenizer.from_pretrained(path.parent)
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("the prompt is empty")
        out = decoder.generate(list(ids), max_tokens, stop_at_eos=True)
        if out and out[-1] in decoder.config["eos_token_ids"]:
            out = out[:-1]
        return tok.decode(out)

    def readme_run(self, fmt: dict) -> list[str]:
        folder = fmt["model_path"].split("/")[0]
        genai = _genai_readme(folder) if fmt.get("genai") else [
            "Its layers keep different numbers of KV heads (a removed attention block keeps none), so "
            "ONNX Runtime GenAI (which sizes one KV cache for all layers) cannot load it; a width plan "
            "made with `--kv-heads keep` can.", ""]
        return ["## Run it", "",
                f"`{folder}/` holds `model.onnx` (weights in `model.onnx.data`, {fmt['dtype']}), written "
                "with ONNX Runtime's fused operators (GroupQueryAttention, SkipSimplifiedLayerNormalization"
                ", MatMulNBits for int8 / int4), the tokenizer files and `model_config.json` (per-layer "
                "sizes, head size, eos ids, chat template).", "", *genai,
                "With onnxruntime alone, one graph serves prefill and decode:", "",
                "    inputs   input_ids, attention_mask   int64 (batch, tokens; padding on the right)",
                "             past_key_values.{i}.key / .value   (batch, layer i's KV heads,",
                "                                                 past tokens, head size)",
                "    outputs  logits (batch, tokens, vocab), present.{i}.key / .value", "",
                "Layer i's KV heads are `layers[i].n_kv` in `model_config.json` (a layer with none has no "
                "cache inputs or outputs); an empty cache has 0 past tokens. Greedy decoding:", "",
                "```python", "import json", "", "import numpy as np", "import onnxruntime as ort",
                "from tokenizers import Tokenizer", "",
                f'cfg = json.load(open("{folder}/model_config.json"))',
                f'session = ort.InferenceSession("{folder}/model.onnx")',
                f'tok = Tokenizer.from_file("{folder}/tokenizer.json")',
                'past = {f"past_key_values.{i}.{kv}": np.zeros((1, layer["n_kv"], 0, cfg["head_dim"]), '
                'cfg["past_dtype"])',
                '        for i, layer in enumerate(cfg["layers"]) if layer["n_kv"]'
                ' for kv in ("key", "value")}',
                'ids, out = tok.encode("Hello").ids, []',
                "for _ in range(32):",
                '    n = next(iter(past.values())).shape[2]',
                '    feed = {"input_ids": np.array([ids], np.int64),',
                '            "attention_mask": np.ones((1, n + len(ids)), np.int64), **past}',
                "    logits, *present = session.run(None, feed)",
                "    past = dict(zip(past, present))",
                "    ids = [int(logits[0, -1].argmax())]",
                '    if ids[0] in cfg["eos_token_ids"]:', "        break", "    out += ids",
                "print(tok.decode(out))", "```", ""]

    def summary_rows(self, section: dict) -> list[tuple[str, str, str]]:
        b, par = section["benchmark"], section["parity"]
        if par["greedy_identical"] is None:
            generation = f"not compared: {par['greedy_not_compared']}"
        else:
            generation = ("identical" if par["greedy_identical"] else
                          f"differs at token {par['greedy_first_difference']}")
        genai = par.get("genai", {})
        if genai.get("checked"):
            genai_text = "same greedy tokens" if genai["identical"] else (
                f"greedy tokens differ at {genai['first_difference']}")
        else:
            genai_text = f"not checked: {genai.get('reason', 'an older export')}"
        return [(f"ONNX {section['dtype']} files ({section['folder']}/)", "", format_bytes(b["file_bytes"])),
                ("ONNX vs PyTorch: max |logit diff|", "", f"{par['max_abs_logit_diff']:.2e}"),
                ("ONNX greedy agreement / generation", "",
                 f"{par['top1_agreement']:.1%} / {generation} ({par['greedy_tokens']} tokens)"),
                ("ONNX Runtime GenAI", "", genai_text),
                *[(f"{figure} ({section['provider']})" if "tokens/s" in figure else figure, d, v)
                  for figure, d, v in super().summary_rows(section)]]

    def bytes_per_token(self, path: Path) -> int:
        """Every initializer (layer weights, their MatMulNBits scales, norms, the output layer) but
        those only gathered from (an embedding table no output layer multiplies by) and the rotary
        tables: one row of each is read per token."""
        import onnx as onnx_py

        model = onnx_py.load(str(path / MODEL_FILE), load_external_data=False)  # the sizes alone
        multiplied = {name for node in model.graph.node if node.op_type not in GATHERS for name in node.input}
        itemsize = lambda t: onnx_py.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize  # noqa: E731
        return sum(math.prod(t.dims) * itemsize(t) for t in model.graph.initializer
                   if t.name in multiplied and not t.name.startswith("rotary"))

    def reads(self, path: Path) -> Path | None:
        folder = path.parent if path.suffix == ".onnx" else path
        return folder if folder.is_dir() else None


def _genai_readme(folder: str) -> list[str]:
    return ["`genai_config.json` makes it an ONNX Runtime GenAI model (`pip install onnxruntime-genai`):", "",
            "```python", "import onnxruntime_genai as og", "",
            f'model = og.Model("{folder}")',
            "tokenizer = og.Tokenizer(model)",
            "params = og.GeneratorParams(model)",
            "params.set_search_options(max_length=256)",
            "generator = og.Generator(model, params)",
            'generator.append_tokens(tokenizer.encode("Hello"))',
            "while not generator.is_done():", "    generator.generate_next_token()",
            "print(tokenizer.decode(generator.get_sequence(0)))", "```", ""]


def _runner():
    """The runner, imported when first used: it runs as ``python -m`` in a child process, where a
    registry entry that imported it first would load it twice."""
    from mosaic_export.targets.onnx import runner

    return runner

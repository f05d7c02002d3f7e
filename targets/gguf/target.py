"""The GGUF target: files for stock llama.cpp, as the registry sees it. Its constants are in
table.py; the writer (writer.py, with pricing.py: torch and gguf-py) loads when a method needs it,
so that the registry and the runtime's child process stay light."""

from __future__ import annotations

from pathlib import Path

from mosaic_export.core.errors import UserError
from mosaic_export.core.units import format_bytes
from mosaic_export.targets.base import Target
from mosaic_export.targets.gguf import table
from mosaic_export.targets.gguf.table import FLOAT_TYPES, GENERATE_CONTEXT, QUANT_TYPES


class GGUF(Target):
    name = "gguf"
    engine = "llama.cpp"
    option = "quant"
    noun = "GGUF type"
    types = FLOAT_TYPES + QUANT_TYPES
    search_types = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
    default_type = "F16"
    packages = ("gguf", "llama-cpp-python")
    nominal_base = 64 * 2**20
    streams = True

    def alignment(self, type_: str) -> int:
        return table.alignment(self.check_type(type_))

    def float32_first(self, type_: str, row_lengths: set[int]) -> bool:
        # llama.cpp's quantizer reads an F32 file; gguf-py writes its types when the rows fit (direct)
        return type_ not in table.DIRECT_TYPES or any(n % table.alignment(type_) for n in row_lengths)

    def kv_bytes_per_value(self, type_: str) -> int:
        return 2  # llama.cpp keeps the KV cache in F16

    def output_rows(self, tokens: int) -> int:
        return 1  # llama.cpp computes the logits of the last position only

    def tensor_types(self, loaded, type_: str) -> dict[str, str]:
        from mosaic_export.targets.gguf.pricing import intended_types

        return intended_types(loaded, type_)

    def tensor_bytes(self, name: str, rows: int, cols: int, type_: str, matmul: bool,
                     tensor_types: dict[str, str] | None) -> int:
        from mosaic_export.targets.gguf.pricing import resolved_type, tensor_bytes

        if tensor_types is None or name not in tensor_types:
            raise ValueError(f"no intended GGUF type for {name}")
        return tensor_bytes(resolved_type(tensor_types[name], cols), rows, cols)

    def check_layer_sizes(self, loaded, may_differ: bool) -> None:
        table.check_layer_sizes(loaded, may_differ)

    def check_exportable(self, loaded) -> None:
        from mosaic_export.targets.gguf.writer import check_exportable

        check_exportable(loaded)

    def artifact_name(self, type_: str) -> str:
        return f"model-{type_}.gguf"

    def export(self, loaded, path: Path, type_: str) -> None:
        from mosaic_export.targets.gguf.writer import export

        export(loaded, path, type_)

    def benchmark(self, path: Path, **options) -> dict:
        return _runner().benchmark(path, **options)

    def deploy(self, loaded, path: Path, type_: str, parity_ids, runtime, evaluation, log) -> dict:
        from mosaic_export.targets.gguf.writer import deploy

        log(f"exporting GGUF {type_} and checking it in llama.cpp")
        return deploy(loaded, path, type_, parity_ids, evaluation)

    def manifest_format(self, section: dict) -> dict:
        return {"quant": section["type"], "arch": section["arch"], "model_path": section["file"]}

    def verify_parity(self, loaded, path: Path, fmt: dict, ids, recorded: dict,
                      threads: int | None) -> tuple[dict, float]:
        from mosaic_export.method.evaluate import forward_model

        probe = recorded.get("tokenizer_probe") or {}
        parity = _runner().next_token_agreement(forward_model(loaded), path, ids, threads,
                                             text=probe.get("text"), name=fmt["model_path"])
        if probe.get("ids") is not None and parity.pop("text_ids") != probe["ids"]:
            raise UserError(f"verify: {fmt['model_path']}: llama.cpp tokenizes the recorded probe text "
                            f"differently from the build's reference ({probe.get('reference')})")
        return parity, table.MIN_AGREEMENT.get(fmt["quant"], 0.0)

    def generate(self, path: Path, prompt: str, max_tokens: int, chat: bool, threads: int | None) -> str:
        return _runner().run_llama("generate", path, prompt=prompt, max_tokens=max_tokens, no_chat=not chat,
                         threads=threads, context=GENERATE_CONTEXT)["text"]

    def readme_run(self, fmt: dict) -> list[str]:
        path = fmt["model_path"]
        return ["## Run it", "", f"`{path}` is a GGUF file for stock llama.cpp (arch `{fmt['arch']}`, "
                f"type {fmt['quant']}; tokenizer and chat template, if any, inside):", "",
                f"    llama-cli -m {path} -cnv", "", "From Python (llama-cpp-python):", "",
                "```python", "from llama_cpp import Llama", "",
                f'llm = Llama(model_path="{path}", n_ctx=2048)',
                'reply = llm.create_chat_completion([{"role": "user", "content": "Hello"}], '
                "temperature=0)",
                'print(reply["choices"][0]["message"]["content"])', "```", ""]

    def summary_rows(self, section: dict) -> list[tuple[str, str, str]]:
        b, parity = section["benchmark"], section["parity"]
        return [(f"GGUF {section['type']} ({section['arch']}) file", "", format_bytes(b["file_bytes"])),
                ("GGUF greedy agreement with PyTorch", "",
                 f"{parity['top1_agreement']:.1%} of {parity['positions']}"),
                ("GGUF fallback tensors", "", str(len(section["fallbacks"]))),
                *super().summary_rows(section)]

    def bytes_per_token(self, path: Path) -> int:
        """Every decoder-layer tensor, the final norm and the output layer (the token embedding
        when it is tied); not the embedding table (one row of it is read per token)."""
        import gguf as gguf_py

        tensors = {t.name: int(t.n_bytes) for t in gguf_py.GGUFReader(path).tensors}
        output = tensors.get("output.weight", tensors["token_embd.weight"])
        return (sum(n for name, n in tensors.items() if name.startswith("blk.")) + output
                + tensors["output_norm.weight"])

    def report_notes(self, section: dict) -> list[str]:
        setup = (section.get("benchmark") or {}).get("llama_setup") or {}
        if not setup.get("fallback_after"):
            return []
        return ["## Runtime set-up", "",
                f"{setup['fallback_after']}; the runs were repeated with llama.cpp's extra buffer "
                "types off (no AMX matmul, no weight repacking), and the figures above are from "
                "those runs.", ""]

    def reads(self, path: Path) -> Path | None:
        return path if path.suffix == ".gguf" else None


def _runner():
    """The runner, imported when first used: it runs as ``python -m`` in a child process, where a
    registry entry that imported it first would load it twice."""
    from mosaic_export.targets.gguf import runner

    return runner

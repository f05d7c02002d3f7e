"""The GGUF target: files for stock llama.cpp (target.py is the registry entry; writer, runner, tokenizer,
pricing)."""

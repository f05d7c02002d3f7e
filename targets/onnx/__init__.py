"""The ONNX target: folders for ONNX Runtime and ONNX Runtime GenAI (target.py is the registry entry;
writer, graph, data, quant, runner, genai)."""

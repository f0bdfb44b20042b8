"""ExecuTorch export: the export modules as one `.pte` for ExecuTorch's multimodal runner (export.py),
the decoder with its state as mutable buffers (decoder.py) and torchao's quantization (quant.py)."""

"""scaletrain: pre-training of Llama-style models on DeepSpeed ZeRO-2/3 and PyTorch FSDP2."""

__version__ = "0.1.0"

"""hvdllm: train GPT-style language models with PyTorch on Horovod and MPI."""

__version__ = "0.1.0"

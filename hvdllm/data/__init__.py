"""Data: clean, dedup, tokenize and pack text into HDF5 shards; read them back per rank."""

from hvdllm.data.loader import Batch, DistributedBatches, ShardedSamples

__all__ = ["Batch", "DistributedBatches", "ShardedSamples"]

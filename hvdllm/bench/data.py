"""The data loader against a plain np.memmap."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hvdllm.bench.options import LoaderBenchOptions
from hvdllm.data import DistributedBatches, ShardedSamples


def bench_loader(options: LoaderBenchOptions) -> dict:
    """Tokens/s of hvdllm's loader over shuffled batches against reading the same rows in the
    same order from a flat np.memmap of the same tokens, in the same run: alternating rounds,
    the first of each discarded as warm-up, the median of the paired ratios reported."""
    batch_size = options.batch_size
    samples = ShardedSamples(options.data, "train")
    loader = DistributedBatches(samples, 0, 1, batch_size, seed=0, prefetch=options.prefetch)
    batches = min(options.batches, loader.batches_per_epoch)
    row = samples.seq_len + 1
    with tempfile.TemporaryDirectory() as tmp:
        # The baseline's file: every sample in global index order, in the shards' dtype.
        flat = Path(tmp) / "tokens.bin"
        dtype = samples.files[0]["tokens"].dtype
        with open(flat, "wb") as f:
            for shard in samples.files:
                f.write(np.ascontiguousarray(shard["tokens"][...], dtype=dtype).tobytes())
        table = np.memmap(flat, dtype=dtype, mode="r").reshape(len(samples), row)
        order = loader.epoch_order(0)

        def memmap_batches() -> int:
            tokens = 0
            for b in range(batches):
                rows = torch.from_numpy(table[order[b * batch_size:(b + 1) * batch_size]].astype(np.int64))
                batch = (rows[:, :-1].contiguous(), rows[:, 1:].contiguous())  # as the loader's
                tokens += batch[0].numel()
            return tokens

        def hvdllm_batches() -> int:
            loader.load_state_dict({"epoch": 0, "batch": 0})
            it = iter(loader)
            tokens = sum(next(it).inputs.numel() for _ in range(batches))
            loader.close()
            return tokens

        rates: dict[str, list[float]] = {"memmap": [], "hvdllm": []}
        for _ in range(options.rounds):  # alternating, after one warm-up pass of each
            for name, fn in (("memmap", memmap_batches), ("hvdllm", hvdllm_batches)):
                start = time.perf_counter()
                tokens = fn()
                rates[name].append(tokens / (time.perf_counter() - start))
        ratios = [h / m for h, m in zip(rates["hvdllm"][1:], rates["memmap"][1:])]
    samples.close()
    return {"benchmark": "loader", "folder": options.data, "batch_size": batch_size, "batches": batches,
            "seq_len": samples.seq_len, "prefetch": options.prefetch,
            "tokens_per_s": {name: statistics.median(values[1:]) for name, values in rates.items()},
            "rounds": {"ratio": ratios, **rates},
            "ratio_hvdllm_over_memmap": statistics.median(ratios), "target_ratio_min": 0.5}

"""The manifest ``hvdllm prepare`` writes last, from what every rank gathered to rank 0, and
the summary it prints of it."""

from __future__ import annotations

import sys
from collections import Counter

from hvdllm.data import shards
from hvdllm.data.encode import SPLITS
from hvdllm.data.tokenizer import tokenizer_sha256


def _shard_order(entry: dict) -> tuple[int, int]:
    """(split, shard number): "train-100000.h5" comes after "train-99999.h5"."""
    return SPLITS.index(entry["split"]), int(entry["file"].rsplit("-", 1)[1].split(".")[0])


def build_manifest(opts, size: int, tok, with_mask: bool, gathered: list) -> dict:
    global_counts = ("exact_duplicates", "near_duplicates")  # already global on every rank
    total = Counter()
    for _, stats, _, _, _ in gathered:
        total.update({k: v for k, v in stats.items() if k not in global_counts})
    for key in global_counts:
        total[key] = gathered[0][1].get(key, 0)
    entries = sorted((e for part, *_ in gathered for e in part), key=_shard_order)
    row = opts.seq_len + 1
    for s in SPLITS:
        packed = sum(e["tokens"] for e in entries if e["split"] == s)
        total[f"{s}_samples"] = packed // row
        total[f"{s}_tokens_dropped_tail"] = total.pop(f"{s}_tokens_in_stream", 0) - packed
    seconds = {step: max(g[2].get(step, 0.0) for g in gathered) for step in gathered[0][2]}
    elapsed = sum(seconds.values())
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    features = {"tokens": {"shape": [row], "dtype": shards.token_dtype(vocab_size).name}}
    if with_mask:
        features["loss_mask"] = {"shape": [row], "dtype": "uint8"}
    return {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "seq_len": opts.seq_len,
        "vocab_size": vocab_size,
        "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer_sha256(tok), "kind": opts.tokenizer},
        "features": features,
        "shards": entries,
        "stats": dict(sorted(total.items())),
        # How this run went (differs between runs of the same data; everything else does not).
        "timing": {"ranks": size, "seconds": seconds, "total_seconds": elapsed,
                   "mb_per_s_per_rank": total["bytes"] / 1e6 / max(elapsed, 1e-9) / size,
                   "peak_rss_mb": {step: max(g[3].get(step, 0.0) for g in gathered) for step in gathered[0][3]},
                   "dedup_state_bytes_per_rank": max(g[4] for g in gathered)},
        "options": opts.result_options(),
    }


def print_summary(manifest: dict, file=sys.stdout) -> None:
    st = manifest["stats"]
    print(f"read {st.get('files', 0)} files ({st.get('bytes', 0) / 1e6:.1f} MB, {st.get('records', 0)} records); "
          f"dropped: {st.get('missing_text', 0)} empty, {st.get('not_text', 0)} not text, "
          f"{st.get('bad_json_lines', 0)} bad JSON, "
          f"{st.get('dropped_short', 0)} short, {st.get('dropped_noisy', 0)} noisy, "
          f"{st.get('exact_duplicates', 0)} exact duplicates, {st.get('near_duplicates', 0)} near duplicates",
          file=file)
    print(f"train: {st.get('train_docs', 0)} docs, {st.get('train_samples', 0)} samples; "
          f"val: {st.get('val_docs', 0)} docs, {st.get('val_samples', 0)} samples of {manifest['seq_len'] + 1} "
          f"tokens; vocab {manifest['vocab_size']}; {len(manifest['shards'])} shards; "
          f"{manifest['timing']['mb_per_s_per_rank']:.2f} MB/s per rank", file=file)

"""`hvdllm bench prepare` end to end on a tiny corpus: raw encode_batch and prepare on the same
bytes, 1 -> 2 ranks, and peak RSS on two sizes, in one run."""

import json
import tempfile
from pathlib import Path

from helpers.corpus import hvdllm


def _scratch_folders():
    return set(Path(tempfile.gettempdir()).glob("hvdllm-bench-prepare-*"))


def test_prepare_benchmark_reports_rates_against_raw_scaling_and_rss(tmp_path):
    before = _scratch_folders()
    run = hvdllm("bench", "prepare", "--mb", "0.4", "--scale", "3", "--rounds", "1", "--threads", "1",
                 "--json", str(tmp_path / "p.json"), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "p.json").read_text())
    rates = result["mb_per_s"]
    assert set(rates) == {"raw", "prepare", "one_rank_one_thread", "two_ranks_one_thread"}
    assert all(rate > 0 for rate in rates.values())
    assert abs(result["prepare_over_raw"] - rates["prepare"] / rates["raw"]) < 1e-9  # one round: no median
    assert list(result["peak_rss_mb"]) == ["0.4 MB", "1.2 MB"] and result["rss_ratio"] > 0
    assert set(result["phase_seconds"]["large"]) == {"tokenizer", "scan", "dedup", "split", "pack"}
    assert "raw encode_batch" in run.stdout and "target >= 1.8" in run.stdout
    assert _scratch_folders() == before  # its corpora and datasets are gone

"""`hvdllm bench overhead` and `bench scaling` end to end on a tiny model: each measures
hvdllm and its baseline in the same run and writes the ratios."""

import json

from helpers.corpus import NANO, hvdllm, make_dataset


def test_overhead_and_scaling_benchmarks_report_ratios(tmp_path):
    data = make_dataset(tmp_path / "ds")
    common = ("--config", NANO, "--steps", "6", "--rounds", "1", f"--data.path={data}")

    overhead = hvdllm("bench", "overhead", *common, "--threads", "1", "--switches", "fused", "--json",
                      str(tmp_path / "o.json"), timeout=600)
    assert overhead.returncode == 0, overhead.stderr[-3000:]
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["overrides"] == [f"--data.path={data}"]  # the runs read the tiny dataset, not data/demo
    assert all(result["tokens_per_s"][k] > 0 for k in ("plain_pytorch", "hvdllm"))
    assert result["ratio_hvdllm_over_plain"] == result["rounds"]["ratio"][0] > 0
    assert 0.2 < result["interleaved_ratio"] < 5  # the same steps in one process: near 1 unless broken
    assert "hvdllm train / plain PyTorch loop tokens/s" in overhead.stdout
    # The whole loop as well as the inside of the step, each said for what it covers.
    assert all(result["loop_tokens_per_s"][k] > 0 for k in ("plain_pytorch", "hvdllm"))
    assert set(result["figures"]) == {"tokens_per_s", "loop_tokens_per_s"}
    assert "time inside the step only. Whole loop (logging, metrics, data waits included): " in overhead.stdout
    # A speed switch (train.compile is tested in test_compile.py; compiling takes too long here).
    fused = result["speed_switches"]["fused"]
    assert fused["overrides"] == ["--optim.fused=on"] and fused["tokens_per_s"] > 0
    assert fused["ratio_over_default"] == fused["tokens_per_s"] / result["rounds"]["hvdllm"][0]["step"]
    assert "speed switch fused (--optim.fused=on): x" in overhead.stdout

    scaling = hvdllm("bench", "scaling", *common, "--json", str(tmp_path / "s.json"), timeout=600)
    assert scaling.returncode == 0, scaling.stderr[-3000:]
    result = json.loads((tmp_path / "s.json").read_text())
    for name in ("hvdllm", "ddp_gloo"):
        one, two = result["tokens_per_s_1_rank"][name][0], result["tokens_per_s_2_ranks"][name][0]
        assert result["efficiency"][name] == two / (2 * one) > 0
    assert "weak scaling 1 -> 2 ranks" in scaling.stdout

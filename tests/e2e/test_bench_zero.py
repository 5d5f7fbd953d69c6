"""`hvdllm bench zero` end to end on a tiny model: zero 0, 1 and 2 on 2 ranks in one run, each
rank's optimizer state and the throughput against zero 0's."""

import json

from helpers.corpus import NANO, hvdllm, make_dataset


def test_zero_benchmark_reports_state_bytes_and_throughput_against_zero_0(tmp_path):
    data = make_dataset(tmp_path / "ds")
    run = hvdllm("bench", "zero", "--config", NANO, "--steps", "6", "--rounds", "1", f"--data.path={data}",
                 "--json", str(tmp_path / "z.json"), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "z.json").read_text())
    stages = result["stages"]
    assert set(stages) == {"0", "1", "2"} and all(s["tokens_per_s"] > 0 for s in stages.values())
    plain = stages["0"]["optimizer_state_bytes"]
    for zero in ("1", "2"):
        # Half the state on each of the 2 ranks, give or take one whole tensor.
        assert stages[zero]["optimizer_state_bytes"] <= result["optimizer_state_bound_bytes"] < plain
        assert stages[zero]["within_state_bound"] and stages[zero]["throughput_ratio"] > 0
    assert stages["0"]["gradient_bytes"] is None and stages["2"]["gradient_bytes"] > 0
    assert "zero 1: " in run.stdout and "throughput x" in run.stdout

"""`hvdllm bench pipeline` end to end on a tiny model: the bubble of each schedule next to the
formula, and activation memory per stage that follows each schedule's micro-batches in flight."""

import json

from helpers.corpus import hvdllm

from hvdllm.bench.pipeline import bubble_formula


def test_pipeline_bench_reports_bubbles_and_activation_peaks(tmp_path):
    out = tmp_path / "pipeline.json"
    run = hvdllm("bench", "pipeline", "--stages", "2", "--micro-batches", "1,4", "--preset", "gpt-nano",
                 "--batch-size", "8", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--json", str(out),
                 timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = {(c["schedule"], c["micro_batches"]): c for c in result["cases"]}
    assert set(cases) == {("gpipe", 1), ("gpipe", 4), ("1f1b", 1), ("1f1b", 4)}
    for case in cases.values():
        assert case["bubble_formula"] == bubble_formula(2, case["micro_batches"])
        assert len(case["bubble_per_stage"]) == 2 and all(0 <= b < 1 for b in case["bubble_per_stage"])
    # GPipe holds all 4 micro-batches on each stage; 1F1B at most p - stage of them.
    gpipe, one_f = cases[("gpipe", 4)], cases[("1f1b", 4)]
    assert one_f["peak_activation_bytes_per_stage"][0] < 0.75 * gpipe["peak_activation_bytes_per_stage"][0]
    assert all(check["within"] for check in result["memory_checks"])
    assert (tmp_path / "pipeline.png").stat().st_size > 0

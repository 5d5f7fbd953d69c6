"""`hvdllm bench grow` end to end on gpt-nano: a small model, the large one grown from it and
the large one from scratch, their curves, the target and the ratios."""

import json

from helpers.corpus import NANO, hvdllm, make_dataset


def test_grow_bench_races_the_grown_model_against_scratch(tmp_path):
    data = make_dataset(tmp_path / "ds")
    out = tmp_path / "grow.json"
    run = hvdllm("bench", "grow", "--config", NANO, "--small", "model.n_layer=1,model.d_model=16,model.n_head=1",
                 "--small-steps", "20", "--steps", "8", "--eval-every", "4", "--json", str(out), f"--data.path={data}",
                 "--train.threads=1", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    grown, scratch = result["cases"]["grown"], result["cases"]["scratch"]
    assert [p["step"] for p in result["small_curve"]] == [4, 8, 12, 16, 20]
    assert [p["step"] for p in grown["curve"]] == [p["step"] for p in scratch["curve"]] == [4, 8]
    # The default target: scratch's loss three quarters into its run (its evaluation at step 8).
    assert result["target_val_loss"] == scratch["final_val_loss"]
    assert scratch["tokens_to_target"] == 8 * result["tokens_per_step"] == 8 * 4 * 32
    # The grown run starts from the trained small model: at its first evaluation it is already
    # better than scratch (20 steps of head start), so it reaches the target at least as soon.
    assert grown["curve"][0]["val_loss"] < scratch["curve"][0]["val_loss"]
    assert result["tokens_ratio_grown_over_scratch"] <= 1.0
    assert result["time_ratio_with_small_training"] > result["time_ratio_grown_over_scratch"] > 0
    assert (tmp_path / "grow.png").stat().st_size > 0 and "with the small model's" in run.stdout

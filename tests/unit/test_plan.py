import json

import pytest
from helpers.corpus import hvdllm

from hvdllm.plan import PlanInputs, build_plan


def test_gpt3_175b_flops():
    plan = build_plan(PlanInputs(model="gpt3-175b", tokens=300e9))
    # GPT-3 paper: 3.14e23 training FLOPs, computed as 6ND.
    assert plan["train_flops_6nd"] == pytest.approx(3.14e23, rel=0.02)
    # PaLM's 6N + 12LHQT adds attention: 12 * 96 * 96 * 128 * 2048 per token.
    attention = 12 * 96 * 96 * 128 * 2048
    assert plan["flops_per_token"] == 6 * plan["params"]["non_embedding"] + attention
    assert plan["train_flops"] == pytest.approx(3.14e23, rel=0.03)


def test_memory_and_min_model_parallel():
    plan = build_plan(PlanInputs(model="gpt3-175b", gpus=1024, gpu_mem_gb=32, checkpointing=True))
    mem = plan["memory_per_gpu"]
    mp = mem["model_parallel"]
    assert mem["weights"] == pytest.approx(2 * plan["params"]["total"] / mp, rel=1e-6)
    assert mem["optimizer"]["adamw"] == pytest.approx(12 * plan["params"]["total"] / mp, rel=1e-6)
    assert mem["optimizer"]["adafactor"] < mem["optimizer"]["adamw"] / 2
    assert mem["activations"]["checkpointing"] < mem["activations"]["no_checkpointing"]
    assert mem["total"]["adamw"] <= 32 * 1024**3
    smaller = build_plan(PlanInputs(model="gpt3-175b", gpus=1024, gpu_mem_gb=32, checkpointing=True,
                                    model_parallel=mp // 2))
    assert smaller["memory_per_gpu"]["total"]["adamw"] > 32 * 1024**3  # so mp is the smallest
    small = build_plan(PlanInputs(model="gpt3-small", gpus=8, gpu_mem_gb=80))
    assert small["min_model_parallel"]["adamw"] == 1


def test_sequence_parallel_splits_the_replicated_activations():
    # Korthikanti et al. 2022: per layer s b h (10 + 24 / t + 5 a s / (h t)) bytes, and with sequence
    # parallelism s b h (34 / t + 5 a s / (h t)); a checkpointed layer keeps 2 s b h, or 2 s b h / t.
    whole = build_plan(PlanInputs(model="gpt3-175b", gpus=1024, gpu_mem_gb=32))
    split = build_plan(PlanInputs(model="gpt3-175b", gpus=1024, gpu_mem_gb=32, sequence_parallel=True))
    s, b, h, a, L, t = 2048, 1, 12288, 96, 96, 8
    assert whole["memory_per_gpu"]["tensor_parallel"] == split["memory_per_gpu"]["tensor_parallel"] == t
    attention = 5 * a * s / (h * t)
    assert whole["memory_per_gpu"]["activations"]["no_checkpointing"] == int(L * s * b * h * (10 + 24 / t + attention))
    assert split["memory_per_gpu"]["activations"]["no_checkpointing"] == int(L * s * b * h * (34 / t + attention))
    assert split["memory_per_gpu"]["activations"]["checkpointing"] == int(
        L * 2 * s * b * h / t + s * b * h * (34 / t + attention))
    assert split["assumptions"]["sequence_parallel"]


def test_time_estimate():
    plan = build_plan(PlanInputs(model="gpt3-175b", gpus=1024, gpu_tflops=125, mfu=0.4))
    assert plan["time"]["seconds"] == pytest.approx(plan["train_flops"] / (1024 * 125e12 * 0.4))


def test_cli_json_and_errors():
    out = hvdllm("plan", "--model", "gpt3-xl", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params"]["total"] > 1.2e9
    bad = hvdllm("plan", "--model", "gpt3-huge")
    assert bad.returncode == 2 and "unknown model preset" in bad.stderr
    bad = hvdllm("plan", "--mfu", "2")
    assert bad.returncode == 2 and "--mfu" in bad.stderr


def test_plan_states_assumptions_and_what_would_fit():
    out = hvdllm("plan", "--model", "gpt3-xl", "--gpus", "3", "--gpu-mem-gb", "16", "--micro-batch", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("assumptions        16 GiB per GPU, micro-batch 2 of 2048 tokens")
    assert ("adamw does not fit; it fits with activation checkpointing (--checkpointing) at --model-parallel 2 "
            "on a GPU count it divides, e.g. --gpus 4") in out.stdout
    plan = build_plan(PlanInputs(model="gpt3-175b", gpus=8, gpu_mem_gb=16))
    assert plan["fit"] == ["fits with activation checkpointing (--checkpointing) at --model-parallel 256 on a "
                           "GPU count it divides, e.g. --gpus 256"]
    assert build_plan(PlanInputs(model="gpt3-small", gpus=8, gpu_mem_gb=80))["fit"] == []


def test_plan_names_the_train_flags_of_its_layout():
    assert build_plan(PlanInputs(model="gpt3-small", gpus=8, gpu_mem_gb=80))["train_overrides"] == [
        "--parallel.tensor=1", "--parallel.pipeline=1", "--parallel.data=8"]
    # The seed's case: tensor 8 x pipeline 32 x data 4 for GPT-3 175B, which hvdllm train runs,
    # with any optimizer (Adafactor's factored moments are reduced over the tensor group).
    for optimizer in ("adamw", "adafactor"):
        gpt3 = build_plan(PlanInputs(model="gpt3-175b", gpus=1024, gpu_mem_gb=32, optimizer=optimizer))
        mem = gpt3["memory_per_gpu"]
        assert (mem["tensor_parallel"], mem["pipeline_parallel"], mem["data_parallel"]) == (8, 32, 4)
        assert gpt3["train_overrides"] == ["--parallel.tensor=8", "--parallel.pipeline=32", "--parallel.data=4"]
    # 4 all-reduces per layer of 96 / 32 = 3 layers, each of s b h bf16 bytes, a ring moving 2 (t - 1) / t of it.
    assert gpt3["tensor_traffic"] == {"all_reduces_per_micro_batch": 12,
                                      "per_micro_batch_bytes": int(12 * 2 * 2048 * 12288 * 2 * 7 / 8)}
    out = hvdllm("plan", "--model", "gpt3-175b", "--gpus", "1024", "--sequence-parallel")
    assert ("hvdllm train runs this layout with --parallel.tensor=8 --parallel.pipeline=32 --parallel.data=4 "
            "--parallel.sequence_parallel=true") in out.stdout
    assert "tensor parallel 8: 12 all-reduces" in out.stdout
    piped = build_plan(PlanInputs(model="gpt3-xl", gpus=3, gpu_mem_gb=16))
    assert piped["memory_per_gpu"]["pipeline_parallel"] == 3


def test_plan_prints_the_pipeline_cut():
    plan = build_plan(PlanInputs(model="gpt3-xl", gpus=8, pipeline=4, balance="params"))
    cut = plan["pipeline_cut"]
    assert sum(cut["blocks_per_stage"]) == 24 and len(cut["stage_costs"]) == 4
    # The embedding (50257 x 2048) and the head weigh about 2 blocks each: the end stages take fewer.
    assert cut["blocks_per_stage"][0] < cut["blocks_per_stage"][1] and cut["imbalance"] < 1.1
    out = hvdllm("plan", "--model", "gpt-mini", "--gpus", "2", "--pipeline", "2", "--balance", "flops")
    assert out.returncode == 0, out.stderr
    assert "pipeline cut       2 stages balanced by flops (parallel.stage_layers = [" in out.stdout
    assert "  stage 0: " in out.stdout and " + head, " in out.stdout


def test_plan_prints_the_schedule_as_a_table():
    out = hvdllm("plan", "--model", "gpt-mini", "--gpus", "2", "--pipeline", "2", "--schedule", "gpipe",
                 "--micro-batches", "3")
    assert out.returncode == 0, out.stderr
    assert "schedule           gpipe, 3 micro-batches: bubble 0.250" in out.stdout
    assert "held at the peak per rank [3, 3]" in out.stdout
    assert "  rank 0: 0F0 0F1 0F2   .   . 0B0 0B1 0B2" in out.stdout
    assert "  rank 1:   . 1F0 1F1 1F2 1B0 1B1 1B2   ." in out.stdout
    one_f = build_plan(PlanInputs(model="gpt-mini", gpus=2, pipeline=2, micro_batches=3))["pipeline_cut"]["schedule"]
    assert one_f["name"] == "1f1b" and one_f["peak_activations"] == [2, 1]


def test_zero_divides_the_optimizer_state_and_gradients_over_the_data_ranks():
    """ZeRO's per-GPU memory: 1/d of the state plus up to one whole tensor's share (hvdllm deals
    whole tensors), and the smaller model-parallel degree it lets the layout use."""
    base = dict(model="gpt3-175b", gpus=1024, gpu_mem_gb=32, checkpointing=True, model_parallel=128)
    plain, one, two = (build_plan(PlanInputs(**base, zero=zero))["memory_per_gpu"] for zero in (0, 1, 2))
    data, largest_share = 8, 50257 * 12288 / 8  # the embedding, cut over 8 tensor ranks
    assert one["optimizer"]["adamw"] == pytest.approx(plain["optimizer"]["adamw"] / data + 12 * largest_share, rel=1e-3)
    assert one["gradients"] == plain["gradients"]
    assert two["gradients"] == pytest.approx(plain["gradients"] / data + 2 * largest_share, rel=1e-3)
    proposed = build_plan(PlanInputs(model="gpt3-175b", gpus=1024, gpu_mem_gb=32, checkpointing=True, zero=1))
    assert proposed["memory_per_gpu"]["model_parallel"] < 128  # the state sharded: fewer model-parallel ranks
    assert proposed["min_model_parallel_by_zero"] == {0: 128, 1: 32, 2: 16}
    assert "--parallel.zero=1" in proposed["train_overrides"]

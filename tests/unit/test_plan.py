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

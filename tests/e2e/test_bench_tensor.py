"""`hvdllm bench tensor` end to end on a tiny model: both backends of the tensor group, and
torch.distributed (Gloo here, NCCL where CUDA is), measured in one run, each carrying every
collective of a real split training step."""

import json

from helpers.corpus import hvdllm


def test_tensor_bench_measures_the_backends_and_torch_distributed(tmp_path):
    out = tmp_path / "tensor.json"
    run = hvdllm("bench", "tensor", "--preset", "gpt-nano", "--batch-size", "2", "--seq-len", "16", "--steps", "2",
                 "--warmup", "1", "--json", str(out), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"mpi4py", "horovod", "torch-gloo"}
    assert result["nccl"] == "not measured: no CUDA here (Gloo instead)"
    for backend in result["backends"].values():
        assert 0 < backend["all_reduce_s"] and 0 < backend["token_vector_all_reduce_s"] and 0 < backend["step_s"]
        assert 0 < backend["collective_share"] < 1
        # gpt-nano: 2 blocks x 4, the embedding's and head's (2), the cross entropy's 3
        assert backend["all_reduces_per_step"] == 2 * 4 + 2 + 3
    assert "horovod / mpi4py" in run.stdout

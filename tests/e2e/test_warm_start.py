"""Warm starts through the CLI: ``hvdllm grow`` and ``train.init_from`` (an hvdllm checkpoint,
grown on the fly or not, or ``hf:DIR``: our own export, or a GPT-2 made by transformers).
The strongest check is equivalence: the first step's loss of a run started from a source is
the loss of the source's own weights on that batch, whatever shape the run grew it into."""

import json
import shutil

import pytest
import torch
from helpers.corpus import NANO, error_lines, hvdllm, hvdllm_mpi, read_metrics, train_args

from hvdllm.model import GPT
from hvdllm.train.checkpoint import load_checkpoint, model_config_from_checkpoint

WIDER_AND_DEEPER = ["--model.n_layer=4", "--model.d_model=64", "--model.n_head=4"]


@pytest.fixture(scope="module")
def small(data, tmp_path_factory):
    """A nano model trained for 20 steps: its loss is well below a fresh model's."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    result = hvdllm(*train_args(data, run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir / "checkpoints" / "step-00000020.pt"


def first_loss(data, run_dir, *overrides) -> float:
    result = hvdllm(*train_args(data, run_dir, "--train.steps=2", "--checkpoint.every=0", *overrides))
    assert result.returncode == 0, result.stderr
    return next(r["loss"] for r in read_metrics(run_dir) if r.get("step") == 1)


@pytest.fixture(scope="module")
def small_loss(data, small, tmp_path_factory) -> float:
    """The first step's loss of a run started from the small model as it is."""
    folder = tmp_path_factory.mktemp("first")
    loss = first_loss(data, folder / "same", f"--train.init_from={small}")
    assert first_loss(data, folder / "scratch") - loss > 0.1  # the trained weights are really in
    return loss


def test_a_run_grown_on_the_fly_starts_at_the_small_models_loss(data, small, small_loss, tmp_path):
    grown = first_loss(data, tmp_path / "grown", f"--train.init_from={small}", *WIDER_AND_DEEPER)
    assert abs(grown - small_loss) < 1e-5


def test_every_rank_starts_from_the_grown_model_sync_and_async(data, small, tmp_path):
    """Two data-parallel ranks, and two workers with a parameter server (which builds the
    model on its own): the grown start has the small model's first loss on 2 ranks too, and
    s = 0 gives sync's losses step for step."""
    losses = {}
    async_layout = ["--parallel.strategy=async", "--parallel.servers=1"]
    for name, np, shape in (("small", 2, []), ("sync", 2, WIDER_AND_DEEPER), ("async", 3, WIDER_AND_DEEPER)):
        run_dir = tmp_path / name
        result = hvdllm_mpi(np, *train_args(data, run_dir, "--train.steps=4", "--checkpoint.every=0",
                                            f"--train.init_from={small}", *shape,
                                            *(async_layout if name == "async" else [])), timeout=240)
        assert result.returncode == 0, result.stderr
        losses[name] = [r["loss"] for r in read_metrics(run_dir)]
    assert abs(losses["sync"][0] - losses["small"][0]) < 1e-5
    assert len(losses["sync"]) == 4 and max(abs(a - b) for a, b in zip(losses["sync"], losses["async"])) < 1e-5


def test_a_resumed_run_needs_no_source(data, small, tmp_path):
    """checkpoint.resume wins over train.init_from: the source may be gone by then."""
    source = tmp_path / "source.pt"
    for suffix in ("", ".sha256"):
        shutil.copy(f"{small}{suffix}", f"{source}{suffix}")
    run_dir = tmp_path / "run"
    args = train_args(data, run_dir, f"--train.init_from={source}", *WIDER_AND_DEEPER, "--checkpoint.every=2")
    assert hvdllm(*args, "--train.steps=2").returncode == 0
    source.unlink()
    resumed = hvdllm(*args, "--train.steps=4", "--checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_a_tokenizer_written_differently_is_the_same_tokenizer(data, small, small_loss, tmp_path):
    """The same tokenizer re-saved with other formatting (as a user's tool might) is accepted."""
    folder = tmp_path / "hf"
    assert hvdllm("export", "--checkpoint", str(small), "--out", str(folder)).returncode == 0
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=4))
    assert abs(first_loss(data, tmp_path / "run", f"--train.init_from=hf:{folder}") - small_loss) < 1e-5


def test_grow_writes_a_checkpoint_that_init_from_reads(data, small, small_loss, tmp_path):
    out = tmp_path / "grown.pt"
    result = hvdllm("grow", "--from", str(small), "--out", str(out), "--config", NANO, *WIDER_AND_DEEPER)
    assert result.returncode == 0, result.stderr
    assert "grown from" in result.stdout
    state = load_checkpoint(out)
    cfg = model_config_from_checkpoint(state)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head) == (4, 64, 4)
    small_state = load_checkpoint(small)
    small_model, big_model = GPT(model_config_from_checkpoint(small_state)), GPT(cfg)
    small_model.load_state_dict(small_state["model"])
    big_model.load_state_dict(state["model"])
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert abs(big_model.eval()(ids, ids)[1].item() - small_model.eval()(ids, ids)[1].item()) < 1e-5
    from_file = first_loss(data, tmp_path / "from-file", f"--train.init_from={out}", *WIDER_AND_DEEPER)
    assert abs(from_file - small_loss) < 1e-5

    again = hvdllm("grow", "--from", str(small), "--out", str(out), "--config", NANO, *WIDER_AND_DEEPER)
    assert again.returncode != 0 and "add --overwrite" in error_lines(again)[0]


def test_grow_overwrite_never_replaces_its_source_or_a_run(data, small, tmp_path):
    """--overwrite replaces an earlier grown checkpoint only: not the source it reads (nor its
    folder), nor a file hvdllm did not write."""
    source_bytes = small.read_bytes()
    mine = tmp_path / "mine.pt"
    mine.write_text("keep")
    for out, culprit in ((small, "which this command reads"), (small.parent, "which this command reads"),
                         (mine, "not an earlier hvdllm grow checkpoint")):
        result = hvdllm("grow", "--from", str(small), "--out", str(out), "--overwrite", "--config", NANO,
                        *WIDER_AND_DEEPER)
        assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
        assert culprit in error_lines(result)[0]
    assert small.read_bytes() == source_bytes and mine.read_text() == "keep"
    grown = tmp_path / "grown.pt"
    for _ in range(2):  # the second time an earlier grown checkpoint is replaced
        result = hvdllm("grow", "--from", str(small), "--out", str(grown), "--overwrite", "--config", NANO,
                        *WIDER_AND_DEEPER)
        assert result.returncode == 0, result.stderr


def test_grow_out_under_a_file_names_the_users_path(small, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "grown.pt"
    result = hvdllm("grow", "--from", str(small), "--out", str(out), "--config", NANO, *WIDER_AND_DEEPER)
    assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
    assert str(out) in error_lines(result)[0] and ".tmp-" not in result.stderr


def test_grow_refuses_a_model_too_large_to_build_before_building_it(small, tmp_path):
    result = hvdllm("grow", "--from", str(small), "--out", str(tmp_path / "huge.pt"), "--config", NANO,
                    "--model.n_layer=100000", "--model.d_model=4096", "--model.n_head=32", timeout=60)
    assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
    assert "model.n_layer=100000, model.d_model=4096" in error_lines(result)[0] and "to build" in result.stderr
    assert not (tmp_path / "huge.pt").exists()


def test_init_from_our_hf_export(data, small, small_loss, tmp_path):
    folder = tmp_path / "hf"
    assert hvdllm("export", "--checkpoint", str(small), "--out", str(folder)).returncode == 0
    from_hf = first_loss(data, tmp_path / "from-hf", f"--train.init_from=hf:{folder}")
    assert abs(from_hf - small_loss) < 1e-5


def test_init_from_a_gpt2_made_by_transformers(data, tmp_path):
    """A GPT-2 a user has on disk: transformers' own weights and config.json, with the
    tokenizer the data was prepared with. After one step at a negligible lr, the run's model
    computes transformers' logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    folder = tmp_path / "gpt2"
    theirs.save_pretrained(folder)
    shutil.copy(data / "tokenizer.json", folder / "tokenizer.json")
    run_dir = tmp_path / "run"
    result = hvdllm(*train_args(data, run_dir, f"--train.init_from=hf:{folder}", "--train.steps=1", "--optim.lr=1e-12"))
    assert result.returncode == 0, result.stderr
    assert f"initial weights from hf:{folder}" in result.stdout
    state = load_checkpoint(run_dir / "checkpoints" / "step-00000001.pt")
    ours = GPT(model_config_from_checkpoint(state)).eval()
    ours.load_state_dict(state["model"])
    ids = torch.randint(0, 258, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("field, value, culprit", [
    ("n_layer", 1, "model.safetensors holds h.1."),  # a trained layer would be dropped
    ("n_layer", 3, "no tensor h.2.ln_1.weight"),
    ("n_embd", 64, ", 32), but config.json's model (n_layer=2, n_embd=64"),
])
def test_an_hf_config_that_contradicts_its_weights_is_one_line(data, small, tmp_path, field, value, culprit):
    folder = tmp_path / "hf"
    assert hvdllm("export", "--checkpoint", str(small), "--out", str(folder)).returncode == 0
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value, "n_head": 2}))
    result = hvdllm(*train_args(data, tmp_path / "run", "--train.steps=1", f"--train.init_from=hf:{folder}"))
    assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
    assert culprit in error_lines(result)[0] and "grow" not in error_lines(result)[0]


def test_bad_sources_are_one_line(data, small, tmp_path):
    def refused(*overrides) -> str:
        result = hvdllm(*train_args(data, tmp_path / "run", "--train.steps=1", *overrides))
        assert result.returncode != 0 and len(error_lines(result)) == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()
        return error_lines(result)[0]

    assert "whole factor" in refused(f"--train.init_from={small}", "--model.d_model=48", "--model.n_head=3")
    assert "does not exist" in refused(f"--train.init_from={tmp_path / 'nothing.pt'}")
    assert "no config.json" in refused(f"--train.init_from=hf:{tmp_path}")
    folder = tmp_path / "hf"
    assert hvdllm("export", "--checkpoint", str(small), "--out", str(folder)).returncode == 0
    assert f"name it hf:{folder}" in refused(f"--train.init_from={folder}")
    weights = folder / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    assert "not a readable safetensors file" in refused(f"--train.init_from=hf:{folder}")
    weights.write_bytes(intact)
    tokenizer = folder / "tokenizer.json"
    text = tokenizer.read_text()
    tokenizer.unlink()
    assert "no tokenizer.json" in refused(f"--train.init_from=hf:{folder}")
    tokenizer.write_text(text.replace("<|pad|>", "<|fill|>"))  # another special token: another tokenizer
    assert "its tokenizer is not the one" in refused(f"--train.init_from=hf:{folder}")

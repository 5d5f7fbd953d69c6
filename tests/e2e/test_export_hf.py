"""``hvdllm export --format hf``: transformers loads the folder and its logits equal hvdllm's;
a rotary model is refused with one line; an existing folder is replaced only with --overwrite,
and only when it is an earlier export."""

import pytest
import torch
from helpers.corpus import error_lines, hvdllm, train_args

from hvdllm.model import GPT
from hvdllm.train.checkpoint import load_checkpoint, model_config_from_checkpoint


def trained(data, run_dir, *overrides):
    result = hvdllm(*train_args(data, run_dir, "--train.steps=3", *overrides))
    assert result.returncode == 0, result.stderr
    return run_dir / "checkpoints" / "step-00000003.pt"


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_export_with_the_same_logits(data, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    checkpoint = trained(data, tmp_path / "run", f"--model.tie_weights={str(tied).lower()}")
    out = tmp_path / "hf"
    result = hvdllm("export", "--checkpoint", str(checkpoint), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                               "generation_config.json", "tokenizer_config.json"}
    state = load_checkpoint(checkpoint)
    ours = GPT(model_config_from_checkpoint(state)).eval()
    ours.load_state_dict(state["model"])
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, ours.cfg.block_size))
    with torch.no_grad():
        expected, _ = ours(ids)
        got = theirs(ids).logits
    assert (got - expected).abs().max().item() < 1e-4


def test_transformers_generates_with_the_exports_special_tokens_and_stops_at_eos(data, tmp_path):
    """AutoTokenizer and pipeline("text-generation") on the export, with no warning: the
    config's bos/eos/pad are the tokenizer's (not GPT-2's 50256), generation stops at
    <|endoftext|>, and every file follows the umask (safetensors alone made its file 0600)."""
    import logging
    import os
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    checkpoint = trained(data, tmp_path / "run")
    out = tmp_path / "hf"
    assert hvdllm("export", "--checkpoint", str(checkpoint), "--out", str(out)).returncode == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes

    captured = []
    handler = logging.Handler()
    handler.emit = lambda record: captured.append(record.getMessage()) if record.levelno >= logging.WARNING else None
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer = AutoTokenizer.from_pretrained(out)
            model = AutoModelForCausalLM.from_pretrained(out)
            eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
            assert tokenizer.eos_token_id == eos == model.config.eos_token_id == model.generation_config.eos_token_id
            assert tokenizer.pad_token_id == model.config.pad_token_id == tokenizer.convert_tokens_to_ids("<|pad|>")
            assert tokenizer.model_max_length == model.config.n_positions
            # Make EOS the likeliest token after any input: the final norm outputs EOS's own
            # embedding, whose logit (its squared norm) beats every other token's.
            with torch.no_grad():
                model.transformer.ln_f.weight.zero_()
                model.transformer.ln_f.bias.copy_(model.lm_head.weight[eos] * 10)
            generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
            result = generator("def ", max_new_tokens=20, do_sample=False, return_tensors=True)
            prompt = tokenizer("def ")["input_ids"]
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert list(result[0]["generated_token_ids"]) == prompt + [eos]  # stopped at the first EOS, not after 20
    about_special_tokens = ("50256", "eos", "bos", "pad_token", "pad token", "attention mask", "attention_mask")
    noise = [m for m in captured + [str(w.message) for w in caught] if any(k in m.lower() for k in about_special_tokens)]
    assert not noise, noise


def test_a_rotary_model_is_refused_in_one_line(data, tmp_path):
    checkpoint = trained(data, tmp_path / "run", "--model.position=rope")
    result = hvdllm("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert result.returncode != 0 and len(error_lines(result)) == 1 and "Traceback" not in result.stderr
    assert "model.position='rope'" in error_lines(result)[0] and not (tmp_path / "hf").exists()


def test_an_existing_folder_is_kept_without_overwrite(data, tmp_path):
    checkpoint = trained(data, tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    result = hvdllm("export", "--checkpoint", str(checkpoint), "--out", str(out))
    assert result.returncode != 0 and "add --overwrite" in error_lines(result)[0]
    result = hvdllm("export", "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr  # an empty folder is no one's work
    before = (out / "model.safetensors").stat().st_ino
    assert hvdllm("export", "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite").returncode == 0
    assert (out / "model.safetensors").stat().st_ino != before  # an earlier export is replaced


def test_overwrite_never_deletes_what_export_did_not_write(data, tmp_path):
    """Not the run folder it reads, nor a folder holding it, nor a folder with a user's file:
    each is refused in one line and left as it was."""
    run = tmp_path / "runs" / "run"
    checkpoint = trained(data, run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, culprit in ((run, "which this command reads"), (tmp_path / "runs", "which this command reads"),
                         (mine, "not an earlier hvdllm export folder")):
        result = hvdllm("export", "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite")
        assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
        assert str(out) in error_lines(result)[0] and culprit in error_lines(result)[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_out_under_a_file_names_the_users_path(data, tmp_path):
    checkpoint = trained(data, tmp_path / "run")
    (tmp_path / "file").write_text("x")
    result = hvdllm("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "file" / "sub"))
    assert result.returncode != 0 and len(error_lines(result)) == 1, result.stderr
    assert str(tmp_path / "file" / "sub") in error_lines(result)[0] and ".tmp-" not in result.stderr

import subprocess
import sys

import pytest
from helpers.corpus import hvdllm

from hvdllm.config import Config, ConfigError, config_to_toml, load_config


def test_defaults_load():
    assert load_config() == Config()


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 1e-3\nname = 'lamb'\n[model]\nn_layer = 3\n")
    cfg = load_config(path, ["--optim.lr=2e-3", "--optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 2e-3  # CLI beats TOML
    assert cfg.optim.name == "lamb"  # TOML beats default
    assert cfg.model.n_layer == 3
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.steps == Config().train.steps  # default


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key model\.n_layr.*'n_layer'"):
        load_config(None, ["--model.n_layr=4"])


def test_the_old_bench_section_names_what_replaced_it(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("[bench]\nsizes = '8B:1MB'\n")
    for source, overrides in ((path, []), (None, ["--bench.iters=3"])):
        with pytest.raises(ConfigError, match=r"\[bench\] was replaced by the flags of `hvdllm bench NAME`") as err:
            load_config(source, overrides)
        assert "\n" not in str(err.value)


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"optim\.lr must be a number, got 'abc'"):
        load_config(None, ["--optim.lr=abc"])


def test_unknown_section_names_closest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optimizer]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\].*'optim'"):
        load_config(path)


def test_out_of_range_names_field():
    with pytest.raises(ConfigError, match=r"data\.batch_size must be >= 1"):
        load_config(None, ["--data.batch_size=0"])
    with pytest.raises(ConfigError, match=r"optim\.name must be one of"):
        load_config(None, ["--optim.name=sgd"])


@pytest.mark.parametrize("override", ["--train.stall_timeout_s=inf", "--train.peak_flops=nan",
                                      "--parallel.worker_timeout_s=inf", "--optim.grad_clip=inf"])
def test_a_float_field_must_be_finite(override):
    key = override.split("=")[0].removeprefix("--").replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize("run_dir", ["", "  "])
def test_an_empty_run_dir_is_refused(run_dir):
    with pytest.raises(ConfigError, match=r"^train\.run_dir must name a folder"):
        load_config(None, [f"--train.run_dir={run_dir}"])


def test_config_loads_without_torch():
    # Config errors and --print-config answer without paying for torch's import.
    code = "import sys, hvdllm.config; assert 'torch' not in sys.modules, 'hvdllm.config imported torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_string_field_keeps_numeric_looking_value():
    assert load_config(None, ["--train.run_dir=2024"]).train.run_dir == "2024"


def test_phases_and_roundtrip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[[phases]]\nsteps = 5\nseq_len = 32\n[[phases]]\nsteps = 7\nlr = 1e-4\n")
    cfg = load_config(path, ["--train.precision=bf16", "--optim.lr=3e-4"])
    assert [p.steps for p in cfg.phases] == [5, 7]
    dumped = tmp_path / "dump.toml"
    dumped.write_text(config_to_toml(cfg))
    assert "[[phases]]" in dumped.read_text() and load_config(dumped) == cfg


def test_old_stages_key_is_read_as_phases_with_a_note(tmp_path, capsys):
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text("[[stages]]\nsteps = 5\nseq_len = 32\n[[stages]]\nsteps = 7\n")
    new.write_text("[[phases]]\nsteps = 5\nseq_len = 32\n[[phases]]\nsteps = 7\n")
    assert load_config(old) == load_config(new)
    assert capsys.readouterr().err.splitlines() == ["note: [[stages]] is now [[phases]]; read as phases"]


def test_old_and_new_phases_keys_together_are_refused(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text("[[stages]]\nsteps = 5\n[[phases]]\nsteps = 7\n")
    with pytest.raises(ConfigError, match=r"^\[\[stages\]\] and \[\[phases\]\] in one config: .*only \[\[phases\]\]$"):
        load_config(path)


def test_cli_errors_are_one_line(tmp_path):
    for override in ("--model.n_layr=4", "--optim.lr=abc"):
        result = hvdllm("train", override)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_cli_print_config_roundtrips(tmp_path):
    result = hvdllm("train", "--print-config", "--optim.lr=5e-4")
    assert result.returncode == 0, result.stderr
    dumped = tmp_path / "dump.toml"
    dumped.write_text(result.stdout)
    assert load_config(dumped) == load_config(None, ["--optim.lr=5e-4"])


def test_config_path_that_is_a_folder_or_binary(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder, not a file"):
        load_config(tmp_path)
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ConfigError, match="is not a text file"):
        load_config(binary)


def test_overrides_as_key_space_value():
    result = hvdllm("train", "--train.steps", "7", "--optim.lr", "2e-3", "--train.run_dir", "2024",
                    "--print-config")
    assert result.returncode == 0, result.stderr
    assert "steps = 7\n" in result.stdout and "lr = 0.002\n" in result.stdout
    assert 'run_dir = "2024"\n' in result.stdout
    missing = hvdllm("train", "--train.steps", "--print-config")
    assert missing.returncode == 2 and "has no value" in missing.stderr


def test_version_and_defaults_in_help():
    from hvdllm import __version__

    version = hvdllm("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hvdllm {__version__}"
    for verb, shown in (("generate", "--max-new-tokens MAX_NEW_TOKENS\n                        default: 200"),
                        ("prepare", "(default: 256)"), ("plan", "default: 1024"), ("doctor", "(default: 0)")):
        result = hvdllm(verb, "--help")
        assert result.returncode == 0 and shown in result.stdout, (verb, result.stdout)

"""The [tune.space] of `hvdllm tune`: its forms, the config round trip, and one line naming
the entry for every mistake (no optuna needed: the space is checked before the study opens)."""

import pytest

from hvdllm.config import ConfigError, config_to_toml, load_config
from hvdllm.tune.space import Dimension, override, parse_dimension, parse_space


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_each_form_parses_with_the_field_type(tmp_path):
    space = {"optim.lr": {"log": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0, 0.2], "step": 0.1},
             "schedule.warmup_steps": {"int": [0, 50], "step": 10}, "data.batch_size": {"log": [2, 16]},
             "optim.weight_decay": [0, 0.1], "optim.name": ["adamw", "lamb"], "data.shuffle": [True, False]}
    dims = {d.key: d for d in parse_space(space, None, [])}
    assert dims["optim.lr"] == Dimension("optim.lr", "log", False, 1e-4, 1e-2)
    assert dims["model.dropout"].grid_values() == [0.0, 0.1, 0.2]  # exactly: these become overrides
    stepped = parse_space({"model.dropout": {"uniform": [0, 0.3], "step": 0.1}}, None, [])[0]
    assert stepped.grid_values() == [0.0, 0.1, 0.2, 0.3]  # not 0.30000000000000004, past the bound
    assert dims["schedule.warmup_steps"].grid_values() == [0, 10, 20, 30, 40, 50]
    assert dims["data.batch_size"].integer and dims["data.batch_size"].kind == "log"
    assert dims["optim.weight_decay"].choices == (0.0, 0.1)  # a float field's choices are floats
    assert dims["optim.name"].choices == ("adamw", "lamb")


def test_dotted_keys_and_sub_tables_read_alike_and_round_trip(tmp_path):
    quoted = write(tmp_path, '[tune]\ntrials = 3\n[tune.space]\n"optim.lr" = { log = [1e-4, 1e-2] }\n'
                             '"schedule.warmup_steps" = { int = [0, 50] }\n')
    dotted = tmp_path / "d.toml"
    dotted.write_text("[tune]\ntrials = 3\n[tune.space]\noptim.lr = { log = [1e-4, 1e-2] }\n"
                      "[tune.space.schedule]\nwarmup_steps = { int = [0, 50] }\n")
    cfg = load_config(quoted)
    assert load_config(dotted) == cfg
    assert cfg.tune.space == {"optim.lr": {"log": [1e-4, 1e-2]}, "schedule.warmup_steps": {"int": [0, 50]}}
    printed = config_to_toml(cfg)
    assert '[tune.space]\n"optim.lr" = { log = [0.0001, 0.01] }' in printed
    (tmp_path / "printed.toml").write_text(printed)
    assert load_config(tmp_path / "printed.toml") == cfg


@pytest.mark.parametrize("key, value, message", [
    ("optim.lrr", [1e-3], r'tune\.space\["optim\.lrr"\]: unknown key optim\.lrr \(did you mean \'lr\'\?\)'),
    ("optimizer.lr", [1e-3], r'tune\.space\["optimizer\.lr"\]: unknown section \[optimizer\]'),
    ("lr", [1e-3], r'tune\.space\["lr"\]: .*must name section\.key'),
    ("train.run_dir", ["a", "b"], r'train\.run_dir is set by the tuner itself'),
    ("tune.trials", [1, 2], r'tune\.trials is set by the tuner itself'),
    ("optim.betas", [0.9], r'optim\.betas is a list field'),
    ("optim.lr", {"log": [1e-4]}, r'"optim\.lr"\]: log must be \[low, high\], got \[0\.0001\]'),
    ("optim.lr", {"logg": [1e-4, 1e-2]}, r"unknown entry 'logg'; write a list of choices or a table"),
    ("optim.lr", {"log": [1e-4, 1e-2], "uniform": [0, 1]}, r"2 of log, uniform, int"),
    ("optim.lr", {"log": [0, 1e-2]}, r"a log range needs a low bound > 0, got 0"),
    ("optim.lr", {"log": [1e-2, 1e-4]}, r"the low bound must be below the high one"),
    ("optim.lr", {"log": ["a", 1e-2]}, r"log bound must be a number, got 'a'"),
    ("optim.lr", {"int": [1, 2]}, r"optim\.lr is a float field: use \{ uniform"),
    ("data.batch_size", {"uniform": [1, 8]}, r"data\.batch_size is an integer field: use \{ int"),
    ("data.batch_size", {"int": [1.5, 8]}, r"int bound must be an integer, got 1\.5"),
    ("optim.lr", {"log": [1e-4, 1e-2], "step": 1e-3}, r"a log range takes no step"),
    ("optim.lr", 0.001, r'"optim\.lr"\]: write a list of choices or a table .*, got 0\.001'),
    ("optim.lr", [], r"an empty list of choices"),
    ("optim.lr", [[1e-3]], r"a choice must be a number, a string or true/false"),
    ("optim.weight_decay", [0, 0.0], r"a choice is listed twice"),
    ("optim.name", {"uniform": [0, 1]}, r"optim\.name is not a number, so it takes a list of choices"),
])
def test_malformed_entries_name_the_entry(key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_dimension(key, value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("space, message", [
    ({"optim.lr": {"uniform": [-1e-3, 1e-2]}}, r'"optim\.lr"\]: -0\.001 is not a valid value: optim\.lr must be > 0'),
    ({"optim.name": ["adamw", "sgd"]}, r"'sgd' is not a valid value: optim\.name must be one of"),
    ({"data.batch_size": [0, 8]}, r"0 is not a valid value: data\.batch_size must be >= 1"),
    ({"optim.lr": ["fast"]}, r"'fast' is not a valid value: optim\.lr must be a number"),
    ({}, r"tune\.space is empty"),
])
def test_values_the_field_refuses_name_entry_and_value(space, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_space(space, None, [])
    assert "\n" not in str(err.value)


def test_values_are_checked_against_the_config_and_overrides(tmp_path):
    # The values are checked with the file and the overrides every trial gets.
    config = write(tmp_path, "[optim]\nname = 'lamb'\n")
    with pytest.raises(ConfigError, match=r"--optim\.lr is given on the command line but optim\.lr is in tune\.space"):
        parse_space({"optim.lr": [1e-3]}, config, ["--optim.lr=2e-3"])
    with pytest.raises(ConfigError, match=r"unknown key data\.batch"):
        parse_space({"optim.lr": [1e-3]}, config, ["--data.batch=2"])


def test_every_combination_of_model_fields_is_built_before_any_trial(tmp_path):
    """Each value alone is valid; together with the config's d_model 32 (gpt-nano) or another
    searched field, some make no model: one line names the combination."""
    config = write(tmp_path, "[model]\npreset = 'gpt-nano'\n")
    with pytest.raises(ConfigError) as err:
        parse_space({"model.n_head": [3, 4]}, config, [])
    assert str(err.value) == ("tune.space: model.n_head=3 makes no valid model with this config: model.d_model 32 "
                              "is not divisible by model.n_head 3")
    with pytest.raises(ConfigError, match=r"model\.n_head=4, model\.d_model=34 makes no valid model"):
        parse_space({"model.n_head": [2, 4], "model.d_model": {"int": [32, 36], "step": 2}}, config, [])
    with pytest.raises(ConfigError, match=r"model\.n_head=2, model\.position='rope' .* even head dimension"):
        parse_space({"model.n_head": [2], "model.position": ["learned", "rope"]}, config, ["--model.d_model=34"])
    assert len(parse_space({"model.n_head": [2, 4], "model.dropout": {"uniform": [0, 0.2]}}, config, [])) == 2


def test_overrides_parse_back_to_the_value():
    for key, value in (("optim.lr", 1.2345678901234567e-05), ("data.batch_size", 8), ("optim.name", "lamb"),
                       ("data.shuffle", False), ("optim.weight_decay", 0.0)):
        cfg = load_config(None, [override(key, value)])
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


def test_grid_refuses_continuous_ranges():
    with pytest.raises(ConfigError, match=r'"optim\.lr"\]: tune\.sampler = "grid" needs choices or a range with a step'):
        parse_dimension("optim.lr", {"log": [1e-4, 1e-2]}).grid_values()


def test_tune_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"tune\.sampler must be one of tpe, random, grid; got 'cmaes'"):
        load_config(None, ["--tune.sampler=cmaes"])
    with pytest.raises(ConfigError, match=r"tune\.ranks must be >= 1, got 0"):
        load_config(None, ["--tune.ranks=0"])
    with pytest.raises(ConfigError, match=r"tune\.space must be a table, got 3"):
        load_config(None, ["--tune.space=3"])

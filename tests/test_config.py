import os

import pytest

from config import MODEL_PRESETS, TrainConfig, load_config, low_memory
from conftest import ROOT, run_cli
from utils.errors import UserError


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlearn_rate: 0.002\nmodel_size: tiny\n")
    cfg = load_config(str(path), learn_rate=0.005, batch_size_per_gpu=4)
    assert cfg.epochs == 3  # from the file
    assert cfg.learn_rate == 0.005  # the flag beats the file
    assert cfg.batch_size_per_gpu == 4  # flag only
    assert cfg.div_factor == TrainConfig().div_factor  # default
    assert load_config().epochs == TrainConfig().epochs


@pytest.mark.parametrize("where", ["yaml", "flag"])
def test_unknown_key_names_valid_keys(tmp_path, where):
    path = tmp_path / "c.yaml"
    path.write_text("epochz: 3\n" if where == "yaml" else "epochs: 3\n")
    flags = {} if where == "yaml" else {"lern_rate": 0.1}
    with pytest.raises(UserError, match=r"unknown setting '(epochz|lern_rate)'.*valid keys: .*learn_rate"):
        load_config(str(path), **flags)


@pytest.mark.parametrize("key,value", [("epochs", "three"), ("learn_rate", "fast"), ("is_finetune", 3),
                                       ("epochs", 2.5), ("model_size", "huge"), ("batch_size_per_gpu", 0)])
def test_wrong_type_or_value_is_rejected(key, value):
    with pytest.raises(UserError, match=key):
        load_config(**{key: value})


def test_types_are_coerced_where_safe():
    cfg = load_config(learn_rate=1, output_dir=2024, is_finetune="True", finetune_from_ckp_file="x",
                      train_file=["a.parquet", "b.parquet"])
    assert cfg.learn_rate == 1.0 and isinstance(cfg.learn_rate, float)
    assert cfg.output_dir == "2024" and cfg.is_finetune is True
    assert cfg.train_file == ["a.parquet", "b.parquet"]


def test_bad_combination_is_rejected_at_start():
    with pytest.raises(UserError, match="finetune_from_ckp_file"):
        load_config(is_finetune=True)


def test_config_is_frozen():
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 3


def test_presets():
    small = MODEL_PRESETS["small"]
    assert (small.d_model, small.d_ff, small.num_heads, small.d_kv, small.num_layers,
            small.num_decoder_layers) == (768, 3072, 12, 64, 10, 10)
    assert MODEL_PRESETS["tiny"].d_model < small.d_model


def test_low_memory_profile_keeps_the_effective_batch():
    cfg = low_memory(load_config(batch_size_per_gpu=16, gradient_accumulation_steps=4))
    assert cfg.batch_size_per_gpu * cfg.gradient_accumulation_steps == 64
    assert cfg.batch_size_per_gpu < 16
    assert cfg.gradient_checkpointing and cfg.optimizer == "adafactor" and not cfg.keep_in_memory
    assert cfg.log_memory and cfg.empty_cache_steps > 0


def test_cli_unknown_flag_is_one_line_and_exit_2():
    proc = run_cli("train.py", "train", "--epochz=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "unknown flag --epochz; did you mean --epochs?" in proc.stderr and "valid flags" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "data")) if n.endswith(".yaml")))
def test_every_shipped_config_loads(name):
    if "regression" in name:  # a regression file, which the demo config names
        from model.regression import load_checks
        assert len(load_checks(os.path.join(ROOT, "data", name))) == 4
        return
    cfg = load_config(os.path.join(ROOT, "data", name))
    assert cfg.train_file and cfg.output_dir

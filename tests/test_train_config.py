"""Training configs: the shipped configs load, and command-line overrides parse to the fields' types."""

import dataclasses
import json
from pathlib import Path

import pytest

from lumina_jax.cli.train import main as train_main
from lumina_jax.models.flagdit import FlagDiTConfig
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.training import objective, step
from lumina_jax.training.config import TrainConfig, apply_overrides, load_config, shipped_configs

BASE = TrainConfig(workdir="w", pipeline="p", data="m.jsonl", cache="c")


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_configs_load(name):
    assert len(shipped_configs()) >= 2  # found through the installed package
    config = load_config(name)
    assert isinstance(config, TrainConfig) and isinstance(config.transformer, (NextDiTConfig, FlagDiTConfig))
    assert TrainConfig(**json.loads(config.to_json())) == config  # as the run's config.json restores it


def test_overrides_take_the_fields_types():
    config = apply_overrides(
        BASE,
        [
            "steps=25",
            "lr=3e-4",
            "remat=dots",
            "peak_flops=none",
            "snr_type=lognorm",
            "transformer.num_layers=3",
            "transformer.ffn_dim_multiplier=1.5",
            "workdir=/tmp/x",
        ],
    )
    assert (config.steps, config.lr, config.remat, config.peak_flops) == (25, 3e-4, "dots", None)
    assert (config.snr_type, config.workdir) == ("lognorm", "/tmp/x")
    assert config.transformer == NextDiTConfig(num_layers=3, ffn_dim_multiplier=1.5)
    assert BASE.transformer == NextDiTConfig() and BASE.steps == TrainConfig.steps  # the base is not modified
    assert dataclasses.replace(config, steps=1).steps == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=3", "no field 'stepz'"),
        ("steps", "expected field=value"),
        ("steps=many", "not a valid"),
        ("snr_type=gaussian", "not a valid"),
        ("posterior=mode", "not a valid"),
        ("remat=perhaps", "not a valid"),
        ("transformer.depth=3", "NextDiTConfig has no field 'depth'"),
        ("transformer.num_layers.x=3", "NextDiTConfig.num_layers has no fields"),
        ("transformer.num_layers=many", "not a valid"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(BASE, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=-5", "steps=-5: expected 1 or more"),
        ("steps=0", "steps=0: expected 1 or more"),
        ("batch_size=0", "batch_size=0: expected 1 or more"),
        ("save_every=0", "save_every=0: expected 1 or more"),
        ("log_every=0", "log_every=0: expected 1 or more"),
        ("keep_checkpoints=0", "keep_checkpoints=0: expected 1 or more"),
        ("image_size=-16", "image_size=-16: expected 1 or more"),
        ("warmup_steps=-1", "warmup_steps=-1: expected 0 or more"),
        ("lr=0", r"lr=0.0: expected a number above 0"),
        ("lr=nan", r"lr=nan: expected a number above 0"),
        ("ema_decay=1.5", r"ema_decay=1.5: expected a number in \[0.0, 1.0\]"),
        ("caption_dropout=-0.1", r"caption_dropout=-0.1: expected a number in \[0.0, 1.0\]"),
        ("mesh_fsdp=0", r"mesh_fsdp=0: expected -1 \(every device data and tensor leave\), or 1 or more"),
        ("mesh_tensor=0", "mesh_tensor=0: expected 1 or more"),
        ("max_aspect=0.5", "max_aspect=0.5: expected 1.0 or more"),
        ("peak_flops=-1", "peak_flops=-1.0: expected a number above 0"),
        ("pooled_loss_factor=1", r"pooled_loss_factor=1: expected 0 \(no pooled loss\), or 2 or more"),
    ],
)
def test_values_out_of_range_are_refused_with_the_range(override, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        apply_overrides(BASE, [override])


def test_values_at_the_ends_of_their_ranges_are_taken():
    edges = ["steps=1", "ema_decay=0", "ema_decay=1", "caption_dropout=1", "mesh_fsdp=-1", "peak_flops=none"]
    edges += ["pooled_loss_factor=0", "pooled_loss_factor=2", "posterior=mean"]
    assert apply_overrides(BASE, edges).mesh_fsdp == -1


def test_a_config_file_value_out_of_range_names_the_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from lumina_jax.training.config import TrainConfig\n\n"
        "def get_config():\n    return TrainConfig(workdir='w', pipeline='p', data='d', cache='c', batch_size=0)\n"
    )
    with pytest.raises(ValueError, match=f"^{bad}: batch_size=0: expected 1 or more$"):
        load_config(str(bad))


def test_unknown_config_lists_the_known_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits"):
        load_config("no_such_config")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        load_config(str(empty))


def test_training_defaults_are_the_libraries_defaults():
    """One home each: the config's defaults are the ones step.py and objective.py use when not told."""
    assert (BASE.lr, BASE.weight_decay, BASE.grad_clip) == (step.LEARNING_RATE, step.WEIGHT_DECAY, step.GRAD_CLIP)
    assert (BASE.ema_decay, BASE.caption_dropout) == (step.EMA_DECAY, objective.CAPTION_DROPOUT)


def test_a_config_round_trips_through_its_json():
    """The run's config.json (nested transformer as a dict) builds the same config."""
    config = apply_overrides(BASE, ["transformer.num_layers=3", "steps=7"])
    assert TrainConfig(**json.loads(config.to_json())) == config


def config_file(folder, data: str) -> str:
    """A config file reading `data` (named after it)."""
    path = folder / f"{Path(data).stem}.py"
    fields = {
        "workdir": str(folder / "run"),
        "pipeline": str(folder / "base"),
        "cache": str(folder / "cache"),
        "data": data,
    }
    path.write_text(
        "from lumina_jax.training.config import TrainConfig\n\n"
        f"def get_config():\n    return TrainConfig(**{fields!r})\n"
    )
    return str(path)


def test_the_train_commands_say_what_is_wrong_in_one_line(tmp_path, capsys):
    """User errors end in `error: ...` on one line and status 2, never a traceback (nothing here loads a model)."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"image": [b"x"], "caption": ["a cat"]}), tmp_path / "d.parquet")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    cases = [
        (["cache", "--config", config_file(tmp_path, data=str(tmp_path / "d.parquet"))], "has no column 'text'"),
        (["cache", "--config", config_file(tmp_path, data=str(tmp_path / "missing"))], "no such file or folder"),
        (["cache", "--config", config_file(tmp_path, data=str(tmp_path / "empty"))], "no data set here"),
        (["--config", str(broken)], f"{broken}, line 1: "),
    ]
    for argv, message in cases:
        assert train_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_eval_refuses_a_count_below_one(capsys):
    with pytest.raises(SystemExit) as exit:
        train_main(["eval", "--samples-per-digit", "0"])
    assert (
        exit.value.code == 2
        and "--samples-per-digit: '0': expected a whole number, 1 or more" in capsys.readouterr().err
    )

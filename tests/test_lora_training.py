"""LoRA training (`TrainConfig.lora_rank`) on the shipped digits model: only the adapters train and are saved,
the transformer stays frozen in the compute dtype, a resumed run matches a straight one exactly, and the exported
PEFT file merged into the base model computes what the trained adapters compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import relative_error

from lumina_jax import load_transformer
from lumina_jax.assets import DIGITS_MODEL
from lumina_jax.configs.digits_lora import get_config
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.sharding import make_mesh
from lumina_jax.training import digits, loop
from lumina_jax.training.checkpoint import Checkpointer, abstract_train_state
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.step import frozen_weights
from lumina_jax.weights.lora import LORA_WEIGHT_NAME, merge_lora

FLOAT32_BOUND = 1e-5


def recipe(root, **changes) -> TrainConfig:
    """The digits LoRA recipe (configs/digits_lora.py) with its files under `root`."""
    files = dict(workdir=str(root / "run"), data=str(root / "data" / digits.MANIFEST), cache=str(root / "cache"))
    return dataclasses.replace(get_config(), **files, **changes)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> TrainConfig:
    """The digits LoRA recipe on 64 mirrored digits: its data and cache, shared by the runs below."""
    root = tmp_path_factory.mktemp("digits_lora")
    config = recipe(
        root,
        batch_size=8,
        steps=4,
        save_every=2,
        log_every=1,
        sample_every=0,
        lora_dropout=0.1,  # drawn anew each step: resume must draw the same masks
    )
    digits.write_dataset(root / "data", size=32, limit=64, mirrored=True)
    loop.prepare_data(dataclasses.replace(config, prepare=None))
    return dataclasses.replace(config, prepare=None)


def run(base: TrainConfig, workdir, **changes) -> loop.RunSummary:
    return loop.train(dataclasses.replace(base, workdir=str(workdir), **changes), progress=False)


def saved_state(config: TrainConfig, workdir):
    abstract = loop.abstract_transformer(config, loop.architecture(config))
    with Checkpointer(workdir / "checkpoints", read_only=True) as checkpoints:
        return checkpoints.restore(abstract_train_state(abstract, loop.make_run_optimizer(config)))[0]


def test_only_adapters_train_and_the_transformer_stays_in_the_compute_dtype(base):
    config = dataclasses.replace(base, compute_dtype="bfloat16", lora_targets=["attention", "feed_forward"])
    model = loop.initial_transformer(config, make_mesh(fsdp=1))
    _, _, weights, scales = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)  # the adapters' scales: float32
    assert {str(x.dtype) for x in jax.tree.leaves(weights)} == {"bfloat16"}
    frozen = frozen_weights(model)
    assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(weights)) + len(jax.tree.leaves(scales))
    optimizer = loop.make_run_optimizer(config)
    state = abstract_train_state(model, optimizer)
    trained = nnx.state(model, nnx.LoRAParam)
    assert jax.tree.structure(state.params) == jax.tree.structure(trained)
    # the optimizer's moments are the adapters' shapes: nothing of the transformer's weights
    moments = {tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if x.ndim}
    assert moments == {tuple(x.shape) for x in jax.tree.leaves(trained)}
    assert all(str(x.dtype) == "float32" for x in jax.tree.leaves(state.params))


def test_a_resumed_lora_run_matches_a_straight_one_and_exports_a_peft_file(base, tmp_path):
    straight = run(base, tmp_path / "straight")
    run(base, tmp_path / "resumed", steps=2)
    resumed = run(base, tmp_path / "resumed")
    assert (straight.step, resumed.step, resumed.start_step) == (4, 4, 2)
    with pytest.raises(ValueError, match=r"LoRA adapters \{'rank': 8.*asks for \{'rank': 4"):
        run(base, tmp_path / "resumed", steps=6, lora_rank=4)  # adapters of other shapes
    first, second = (saved_state(base, tmp_path / name) for name in ("straight", "resumed"))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [p.name for p in straight.export.iterdir() if not p.name.startswith(".")] == [LORA_WEIGHT_NAME]
    assert (straight.export / LORA_WEIGHT_NAME).read_bytes() == (resumed.export / LORA_WEIGHT_NAME).read_bytes()

    # The file merged into the shipped model = the model with the EMA adapters, unmerged.
    pipeline = loop.base_pipeline(base) / "transformer"
    merged = merge_lora(load_transformer(pipeline, progress=False), straight.export / LORA_WEIGHT_NAME)
    model = loop.with_adapters(base, load_transformer(pipeline, progress=False))
    nnx.update(model, first.ema_params)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    model.eval()  # no dropout
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 1, 32, 32), np.float32))
    t = jnp.asarray([0.3, 0.7], jnp.float32)
    caption = jnp.asarray(rng.standard_normal((2, 6, 64), np.float32))
    mask = jnp.ones((2, 6), jnp.int32)
    assert relative_error(merged(x, t, caption, mask), model(x, t, caption, mask)) <= FLOAT32_BOUND


def test_the_digits_lora_teaches_the_shipped_model_mirror_writing(tmp_path):
    """The recipe, shortened to 200 steps: `train eval --mirrored` (the drawn digits flipped back, then read by
    the classifier) scores the adapted model far above the shipped one, which draws plain digits."""
    summary = loop.train(recipe(tmp_path, steps=200, warmup_steps=20), progress=False)
    shipped = LuminaPipeline.from_pretrained(DIGITS_MODEL, dtype="float32", progress=False)
    adapted = LuminaPipeline.from_pretrained(DIGITS_MODEL, dtype="float32", progress=False)
    adapted.load_lora_weights(summary.export)
    score = dict(samples_per_digit=10, steps=20, mirrored=True)
    before, after = digits.evaluate_pipeline(shipped, **score), digits.evaluate_pipeline(adapted, **score)
    assert after["accuracy"] >= 0.7 and after["accuracy"] - before["accuracy"] >= 0.2, (before, after)

"""One compiled train step for every crop size of a run: batches padded to the run's shape train exactly as
per-shape batches do, and a multi-aspect run compiles the step once."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image
from reference import compilations
from sharding_checks import TINY, tiny_model
from test_train_flagdit import TINY_FLAG, random_flag_dit

from lumina_jax.configs.digits_flag_dit import SIZES as SIZES_OF_A_TRANSFORMER
from lumina_jax.models.flagdit import FlagDiTConfig
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.pipeline import caption_bucket
from lumina_jax.training import digits, loop
from lumina_jax.training.batches import BatchShape, make_batches
from lumina_jax.training.cache import open_cache
from lumina_jax.training.compile_only import planned_step
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.data import crop_sizes
from lumina_jax.training.step import ClippedAdamW, TrainBatch, init_train_state, train_step

FLOAT32_BOUND = 1e-5
# Latent crops of 8, 9 and 6 Next-DiT tokens, 10, 12 and 7 Flag-DiT ones (its end-of-line slots).
SIZES = [(4, 8), (6, 6), (2, 12)]
CAPTION_LENGTHS = [(5, 40), (3, 7), (12, 1)]  # per-shape buckets 64, 32, 32; the run's: 64
OPTIMIZER = ClippedAdamW()
MODELS = {"next-dit": (TINY, tiny_model), "flag-dit": (TINY_FLAG, random_flag_dit)}


def per_shape_and_padded(cfg, size, lengths, seed) -> tuple[TrainBatch, TrainBatch]:
    """Two images of one crop size with their captions: as a per-shape batch (its own tokens, captions at
    their own bucket) and padded to the run's shape (the most tokens of SIZES, captions of the run's bucket)."""
    rng = np.random.default_rng(seed)
    latents = [rng.standard_normal((cfg.in_channels, *size), np.float32) for _ in lengths]
    run_captions = caption_bucket(max(max(pair) for pair in CAPTION_LENGTHS))
    mask = np.arange(run_captions)[None] < np.array(lengths)[:, None]
    caption = np.where(mask[..., None], rng.standard_normal((2, run_captions, cfg.cross_attention_dim)), 0)
    caption = caption.astype(np.float32)
    own = caption_bucket(max(lengths))
    budget = max(cfg.sequence_length(h // cfg.patch_size, w // cfg.patch_size) for h, w in SIZES)
    return (
        TrainBatch.from_latents(latents, caption[:, :own], mask[:, :own], cfg),
        TrainBatch.from_latents(latents, caption, mask, cfg, budget),
    )


def empty_caption(cfg):
    return jnp.asarray(np.random.default_rng(9).standard_normal((1, cfg.cross_attention_dim)), jnp.float32), jnp.ones(
        1, bool
    )


def relative_difference(ours, theirs) -> float:
    """The largest difference of two pytrees relative to the largest magnitude in `theirs` (a leaf of gradients
    that are zero in exact arithmetic, such as a key norm's bias, holds rounding noise alone)."""
    ours, theirs = ([np.asarray(x, np.float64) for x in jax.tree.leaves(tree)] for tree in (ours, theirs))
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs)) / max(float(np.abs(b).max()) for b in theirs)


@pytest.mark.parametrize("family", MODELS)
def test_a_padded_batch_trains_as_its_per_shape_batch(family):
    """The step, its draws of times, noise and dropped captions included: the same loss, gradient norm and
    gradients (Adam's first moment after one step is 0.1 x the clipped gradient)."""
    cfg, build = MODELS[family]
    graphdef, state = init_train_state(build(), OPTIMIZER, jax.random.PRNGKey(0))
    for seed, (size, lengths) in enumerate(zip(SIZES, CAPTION_LENGTHS)):
        own, padded = per_shape_and_padded(cfg, size, lengths, seed)
        assert own.patches.shape[1] < padded.patches.shape[1] or own.caption.shape[1] < padded.caption.shape[1]
        (per_shape, metrics), (ours, our_metrics) = (
            train_step(graphdef, jax.tree.map(jnp.copy, state), batch, *empty_caption(cfg), optimizer=OPTIMIZER)
            for batch in (own, padded)
        )
        for name in ("loss", "grad_norm"):
            assert abs(float(our_metrics[name]) / float(metrics[name]) - 1) <= FLOAT32_BOUND, (size, name)
        gradients = [optax.tree.get(s.opt_state, "mu") for s in (ours, per_shape)]
        assert relative_difference(*gradients) <= FLOAT32_BOUND, size


@pytest.mark.parametrize("family", MODELS)
def test_padding_never_changes_what_a_real_token_sees(family):
    cfg, build = MODELS[family]
    graphdef, params = nnx.split(build())

    @jax.jit
    def forward(params, batch):
        t = jnp.asarray([0.3, 0.8], jnp.float32)
        model = nnx.merge(graphdef, params)
        args = (batch.patches, batch.positions, batch.token_mask, batch.end_of_line, t, batch.caption)
        return model.forward_sequence(*args, batch.caption_mask)

    own, padded = per_shape_and_padded(cfg, SIZES[2], CAPTION_LENGTHS[2], seed=0)  # the most padding
    real = own.patches.shape[1]
    assert padded.patches.shape[1] > real and not padded.token_mask[:, real:].any()
    ours, theirs = forward(params, padded)[:, :real], forward(params, own)
    assert relative_difference(ours, theirs) <= FLOAT32_BOUND


MULTI_ASPECT = NextDiTConfig(
    sample_size=16,
    patch_size=8,
    in_channels=3,
    hidden_size=32,
    num_layers=1,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=16,
    learn_sigma=False,
    cross_attention_dim=32,
)


def write_multi_aspect_data(folder, sizes) -> str:
    """Two random images of each (height, width), with digits captions (the base pipeline's vocabulary)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    lines = []
    for i, (height, width) in enumerate(sizes * 2):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "prompt": digits.caption(i % 10, rng)}) + "\n")
    (folder / "train.jsonl").write_text("".join(lines))
    return str(folder / "train.jsonl")


def test_a_multi_aspect_run_compiles_one_train_step(tmp_path):
    image_size, max_aspect = 128, 4.0
    sizes = crop_sizes(image_size, max_aspect=max_aspect)
    config = TrainConfig(
        workdir=str(tmp_path / "run"),
        pipeline=str(tmp_path / "base"),
        data=write_multi_aspect_data(tmp_path / "data", sizes),
        cache=str(tmp_path / "cache"),
        init="scratch",
        transformer=MULTI_ASPECT,
        image_size=image_size,
        max_aspect=max_aspect,
        batch_size=1,
        steps=30,
        compute_dtype="float32",
        log_every=30,
        save_every=30,
    )
    digits.write_base_pipeline(config.pipeline, text_hidden=32)
    loop.prepare_data(config)
    cache = open_cache(config.cache)
    assert len(set(cache.latent_shapes)) >= 20
    shape = BatchShape.of(cache, MULTI_ASPECT)
    tokens = {(h // 8) * (w // 8) for _, h, w in cache.latent_shapes}
    assert shape.image_tokens == max(tokens) and len(tokens) > 1 and 0 < shape.image_padding < 0.5
    # The run's 30 batches, one crop size each: many sizes, several token counts.
    batches = make_batches(cache, global_batch_size=1, seed=config.seed)
    trained = [next(batches)["latents"].shape[2:] for _ in range(config.steps)]
    assert len(set(trained)) >= 10 and len({(h // 8) * (w // 8) for h, w in trained}) >= 3
    with compilations() as compiled:
        assert loop.train(config, progress=False).step == config.steps
    assert compiled.count("jit(train_step)") == 1, compiled


def test_compile_only_plans_the_run_s_one_shape(tmp_path):
    """A Flag-DiT's widest crops are its longest sequences (an end-of-line slot a row): the plan is their step."""
    transformer = FlagDiTConfig(**{field: getattr(MULTI_ASPECT, field) for field in SIZES_OF_A_TRANSFORMER})
    config = TrainConfig(
        workdir=str(tmp_path / "run"),
        pipeline=str(tmp_path / "written-by-prepare"),
        data="unused",
        cache="unused",
        init="scratch",
        transformer=transformer,
        image_size=128,
        max_aspect=4.0,
    )
    _, (height, width), _ = planned_step(config)  # pixel space: latents are the crops
    tokens = [transformer.sequence_length(h // 8, w // 8) for h, w in crop_sizes(128, max_aspect=4.0)]
    assert transformer.sequence_length(height // 8, width // 8) == max(tokens) > transformer.sequence_length(16, 16)

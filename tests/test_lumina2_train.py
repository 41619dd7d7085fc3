"""Fine-tuning Lumina-Image 2.0 with the original trainer's recipe (lumina_jax/configs/lumina_image_2.py):
its token loss, its shifted times, its captions, and a tiny pipeline fine-tuned, resumed and exported."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from flax import nnx
from reference import random_lumina2_pipeline, randomize_, relative_error
from test_lumina2_parity import CONFIGS

from lumina_jax import load_transformer
from lumina_jax.models.gemma2 import PROMPT_START, SYSTEM_PROMPTS
from lumina_jax.models.lumina2 import UnifiedNextDiT
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.training import digits, loop
from lumina_jax.training.cache import open_cache
from lumina_jax.training.config import load_config
from lumina_jax.training.objective import resolution_time_shift, sample_timesteps
from lumina_jax.training.step import TrainBatch, flow_loss

FLOAT32_BOUND = 1e-5


def random_models(folder, seed: int):
    """diffusers' Lumina2Transformer2DModel at the "odd" config, every parameter random, and ours loaded from it."""
    reference = randomize_(Lumina2Transformer2DModel(**CONFIGS["odd"]).eval(), seed=seed)
    reference.save_pretrained(folder)
    return reference, load_transformer(folder, dtype="float32", progress=False)


def our_loss(model, batch: TrainBatch, noise: list[np.ndarray], t, caption, mask) -> float:
    """flow_loss on a batch's tokens, with noise given as latents laid out as the batch's tokens."""
    length = batch.patches.shape[1]
    noise_tokens = TrainBatch.from_latents([jnp.asarray(x) for x in noise], caption, mask, model.config, length)
    graphdef, params = nnx.split(model)
    args = (jnp.asarray(t), noise_tokens.patches, jnp.asarray(caption), jnp.asarray(mask))
    return float(flow_loss(graphdef, params, batch, *args))


def reference_loss(reference, data: list[np.ndarray], noise: list[np.ndarray], t, caption, mask) -> float:
    """The mean over images of the velocity error of diffusers' model, called on each image alone (as the original
    trainer calls its model on each image's own tokens)."""
    per_image = []
    for i, (x1, x0) in enumerate(zip(data, noise)):
        xt = t[i] * x1 + (1 - t[i]) * x0
        inputs = (xt[None], t[i : i + 1], caption[i : i + 1], mask[i : i + 1].astype(np.int64))
        with torch.no_grad():
            out = reference(*(torch.from_numpy(a) for a in inputs), return_dict=False)[0][0].numpy()
        per_image.append(np.mean(np.square(out.astype(np.float64) - (x1 - x0))))
    return float(np.mean(per_image))


def test_the_token_loss_is_diffusers_models_image_space_loss(tmp_path):
    """Images of three sizes in one batch padded past the longest (a run's one batch shape): our loss is the
    mean of each image's own velocity error, diffusers' model called on that image alone."""
    reference, model = random_models(tmp_path, seed=3)
    channels, features = CONFIGS["odd"]["in_channels"], CONFIGS["odd"]["cap_feat_dim"]
    rng = np.random.default_rng(1)
    sizes = [(4, 6), (8, 4), (6, 6)]  # latents: 6, 8 and 9 tokens of 2x2, padded to 12
    data = [rng.standard_normal((channels, h, w), np.float32) for h, w in sizes]
    noise = [rng.standard_normal((channels, h, w), np.float32) for h, w in sizes]
    caption = rng.standard_normal((3, 7, features), np.float32)
    mask = np.arange(7)[None] < np.array([[7], [2], [4]])
    t = np.array([0.2, 0.55, 0.9], np.float32)
    batch = TrainBatch.from_latents([jnp.asarray(x) for x in data], caption, mask, model.config, length=12)
    assert batch.patches.shape[1] == 12 and batch.end_of_line is None
    ours = our_loss(model, batch, noise, t, caption, mask)
    assert abs(ours / reference_loss(reference, data, noise, t, caption, mask) - 1) <= FLOAT32_BOUND


def test_the_pooled_loss_is_diffusers_models_loss_on_latents_average_pooled_by_torch(tmp_path):
    """finetune.py's 256-px loss: each latent through F.avg_pool2d(latent, 4, 4), then the model's image-space
    loss on it. The third latent pools to 3x3, which the original model cannot take as 2x2 patches (its
    patchify fails): we drop the last row and column, so the reference takes its 2x2 corner."""
    reference, model = random_models(tmp_path, seed=4)
    channels, features = CONFIGS["odd"]["in_channels"], CONFIGS["odd"]["cap_feat_dim"]
    rng = np.random.default_rng(2)
    sizes = [(8, 16), (16, 8), (12, 14)]  # pooled: 2x4, 4x2 and 3x3 (cut to 2x2)
    data = [rng.standard_normal((channels, h, w), np.float32) for h, w in sizes]
    pooled = [torch.nn.functional.avg_pool2d(torch.from_numpy(x), 4, 4).numpy() for x in data]
    pooled = [p[:, : p.shape[1] // 2 * 2, : p.shape[2] // 2 * 2] for p in pooled]  # whole 2x2 patches
    assert [p.shape[1:] for p in pooled] == [(2, 4), (4, 2), (2, 2)]
    noise = [rng.standard_normal(p.shape, np.float32) for p in pooled]
    caption = rng.standard_normal((3, 5, features), np.float32)
    mask = np.arange(5)[None] < np.array([[5], [3], [1]])
    t = np.array([0.3, 0.6, 0.95], np.float32)
    latents = [jnp.asarray(x) for x in data]
    batch = TrainBatch.from_latents(latents, caption, mask, model.config, pooled_by=4, pooled_length=3).pooled
    assert batch.patches.shape[1] == 3
    ours = our_loss(model, batch, noise, t, caption, mask)
    assert abs(ours / reference_loss(reference, pooled, noise, t, caption, mask) - 1) <= FLOAT32_BOUND


@pytest.mark.parametrize("image_size", [256, 512, 1024])
def test_times_are_shifted_as_the_original_trainer_shifts_them(image_size):
    """transport.Transport.sample with do_shift at seq_len (image_size // 16)^2, written out from its source:
    mu linear from 0.5 at 256 tokens to 1.15 at 4096, t <- 1 - e^mu / (e^mu + 1 / (1 - t) - 1)."""
    key = jax.random.PRNGKey(7)
    plain = np.asarray(sample_timesteps(key, 4096, "lognorm"), np.float64)
    shift = resolution_time_shift(image_size)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * ((image_size // 16) ** 2 - 256)
    assert shift == pytest.approx(math.exp(mu), rel=1e-12)
    expected = 1 - math.exp(mu) / (math.exp(mu) + (1 / (1 - plain) - 1))
    got = np.asarray(sample_timesteps(key, 4096, "lognorm", shift))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.mean(got) < np.mean(plain) - 0.05  # towards the noise (t = 0)
    np.testing.assert_array_equal(np.asarray(sample_timesteps(key, 4096, "lognorm", 1.0)), plain.astype(np.float32))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny Lumina-Image 2.0 pipeline (diffusers' layout, random weights), 16 digits at 64x64 (16 image tokens;
    pooled 4 x 4 for the recipe's second loss, 1) and the shipped recipe at that size, its cache built."""
    root = tmp_path_factory.mktemp("lumina2_train")
    corpus = [*digits.caption_vocabulary(), SYSTEM_PROMPTS["base"] + PROMPT_START, SYSTEM_PROMPTS["real"]]
    reference = random_lumina2_pipeline(root / "base", corpus)
    manifest = digits.write_dataset(root / "data", size=64, limit=16)
    config = dataclasses.replace(
        load_config("lumina_image_2"),
        workdir=str(root / "run"),
        pipeline=str(root / "base"),
        data=str(manifest),
        cache=str(root / "cache"),
        image_size=64,
        max_aspect=1.0,
        batch_size=4,
        steps=4,
        compute_dtype="float32",
        remat="none",
        log_every=1,
        save_every=2,
    )
    loop.prepare_data(config)
    return config, reference


def test_the_cache_holds_the_original_trainers_caption_features(tuned):
    """finetune.py's encode_prompt: "base" system prompt + caption, Gemma-2's second-to-last hidden state over
    the real tokens; the dropped caption is "" with no system prompt."""
    config, reference = tuned
    cache = open_cache(config.cache)
    prompts = [cache[i]["prompt"] for i in range(3)]
    texts = [SYSTEM_PROMPTS["base"] + PROMPT_START + p for p in prompts]
    for i, text in enumerate(texts + [""]):
        tokens = reference.tokenizer([text], padding=True, pad_to_multiple_of=8, return_tensors="pt")
        with torch.no_grad():
            hidden = reference.text_encoder(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
            ).hidden_states[-2]
        expected = hidden[0, : int(tokens.attention_mask.sum())].numpy()
        got = cache[i]["caption"] if text else cache.empty_caption
        assert got.shape == expected.shape
        assert relative_error(got, expected) <= FLOAT32_BOUND


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_fine_tune_runs_resumes_and_exports_a_lumina_image_2_pipeline(tuned, tmp_path):
    config, _ = tuned
    straight = loop.train(dataclasses.replace(config, workdir=str(tmp_path / "straight")), progress=False)
    loop.train(dataclasses.replace(config, workdir=str(tmp_path / "resumed"), steps=2), progress=False)
    resumed = loop.train(dataclasses.replace(config, workdir=str(tmp_path / "resumed")), progress=False)
    assert (straight.step, resumed.step) == (4, 4)
    expected, got = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    np.testing.assert_array_equal([m["loss"] for m in got], [m["loss"] for m in expected])
    assert all(np.isfinite(m["loss"]) and m["lr"] == pytest.approx(2e-4) for m in got)
    assert all(0 < m["pooled_loss"] < m["loss"] for m in got)  # the 256-px loss's share (here 16 px)

    pipe = LuminaPipeline.from_pretrained(resumed.export, dtype="float32", progress=False)
    assert isinstance(pipe.transformer, UnifiedNextDiT)
    base = LuminaPipeline.from_pretrained(config.pipeline, dtype="float32", progress=False)
    moved = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(nnx.state(pipe.transformer)), jax.tree.leaves(nnx.state(base.transformer)))
    ]
    assert max(moved) > 0  # the EMA (decay 0.95) moved away from the base weights
    images = pipe(prompt=["the digit 7"], height=64, width=64, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()

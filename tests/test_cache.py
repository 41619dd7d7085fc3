"""The latent/text-feature cache (build, resume, skipped images, reading) and the Grain batch iterator."""

import dataclasses
import gc
import json
import weakref
import zlib
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lumina_jax import sharding
from lumina_jax.models.flagdit import FlagDiTConfig
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.models.vae import AutoencoderKLConfig
from lumina_jax.training.batches import BatchPlan, BatchShape, load_batch, make_batches
from lumina_jax.training.cache import build_cache, open_cache, pipeline_encoders
from lumina_jax.training.data import crop_sizes, load_image, read_manifest
from lumina_jax.training.loop import global_batch
from lumina_jax.training.objective import pooled_latent_size
from lumina_jax.training.step import TrainBatch

IMAGE_SIZE, SEED, SCALE, SHIFT = 64, 0, 0.5, 0.1
# (width, height) of the good images: squares, wide and tall ones, so crops fall into several buckets
IMAGE_SHAPES = [(64, 64)] * 10 + [(96, 48)] * 5 + [(48, 96)] * 5 + [(70, 60), (200, 40)]
WORDS = "red green blue fox cat dog in the snow at night a photo of".split()


class PoolingEncoder:
    """Latent = 8x8 average pooling of the image; log-variance a function of it. Counts its calls
    and raises on call number `fail_at` (1-based), as a crashing encoder would."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected crash")
        return pool(images), np.log(0.25) + 0.5 * pool(images)


def pool(images):
    b, h, w, c = images.shape
    return images.reshape(b, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4)).transpose(0, 3, 1, 2)


def word_vector(word: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(6).astype(np.float32)


def hash_text(prompts):
    """A beginning token, then one hashed vector per word; padded to a multiple of 8 with garbage."""
    tokens = [["<bos>", *p.split()] for p in prompts]
    length = -(-max(map(len, tokens)) // 8) * 8
    features, mask = np.full((len(prompts), length, 6), 99.0, np.float32), np.zeros((len(prompts), length), bool)
    for i, words in enumerate(tokens):
        features[i, : len(words)] = [word_vector(w) for w in words]
        mask[i, : len(words)] = True
    return features, mask


def expected_caption(prompt):
    return np.stack([word_vector(w) for w in ["<bos>", *prompt.split()]])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A manifest in both formats over small PNGs, with one corrupt, one missing and one too small image."""
    folder = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(0)
    lines = []
    for i, (width, height) in enumerate(IMAGE_SHAPES):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        prompt = " ".join(rng.choice(WORDS, 3 + 5 * (i % 3) + (40 if i == 4 else 0)))  # one caption past 32 tokens
        if i % 2:
            lines.append({"path": f"{i}.png", "prompt": prompt})
        else:
            lines.append({"image": f"{i}.png", "conversations": [{"value": "describe"}, {"value": prompt}]})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines.insert(3, {"path": "corrupt.png", "prompt": "broken"})
    lines.insert(9, {"path": "missing.png", "prompt": "gone"})
    Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(folder / "tiny.png")  # under 64 // 4 px high
    lines.insert(15, {"path": "tiny.png", "prompt": "a speck"})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def build(manifest, out, image_encoder=None, **kwargs):
    settings = dict(
        image_size=IMAGE_SIZE,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
        shard_size=5,
        batch_size=2,
        seed=SEED,
        progress=False,
    )
    settings.update(kwargs)
    return build_cache(
        read_manifest(manifest), out, encode_images=image_encoder or PoolingEncoder(), encode_text=hash_text, **settings
    )


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    build(dataset, out)
    return open_cache(out)


def test_cache_holds_each_encoded_example_and_counts_skipped_images(dataset, cache):
    metadata = cache.metadata
    assert metadata["examples"] == len(cache) == len(IMAGE_SHAPES)
    assert metadata["skipped"] == 3
    assert [s["source"] for s in metadata["skipped_images"]] == [f"{dataset}:{line}" for line in (4, 10, 16)]
    assert all(s["reason"] for s in metadata["skipped_images"])
    assert (cache.scaling_factor, cache.shift_factor) == (SCALE, SHIFT)

    manifest = enumerate(read_manifest(dataset))
    good = [(k, e) for k, e in manifest if not e.image.endswith(("corrupt.png", "missing.png", "tiny.png"))]
    for i, (k, example) in enumerate(good):
        item, record = cache[i], cache.records[i]
        image = load_image(example, crop_sizes(IMAGE_SIZE), np.random.default_rng([SEED, k]))
        np.testing.assert_array_equal(item["mean"], pool(image[None])[0])
        np.testing.assert_array_equal(item["logvar"], np.float32(np.log(0.25) + 0.5 * pool(image[None])[0]))
        np.testing.assert_array_equal(item["caption"], expected_caption(example.prompt))  # padding dropped
        assert item["prompt"] == example.prompt
        assert record["source"] == example.where
        assert tuple(record["crop"]) == image.shape[:2] and tuple(record["latent_shape"]) == item["mean"].shape
        assert record["caption_length"] == len(example.prompt.split()) + 1
    np.testing.assert_array_equal(cache.empty_caption, expected_caption(""))
    assert cache.empty_caption_mask.tolist() == [True]


def test_images_are_encoded_in_same_shape_batches(dataset, tmp_path):
    shapes = []

    def encode(images):
        shapes.append(images.shape)
        return pool(images), None

    build(dataset, tmp_path / "cache", encode, batch_size=4)
    assert all(len(s) == 4 and 1 <= s[0] <= 4 for s in shapes)
    assert sum(s[0] for s in shapes) == len(IMAGE_SHAPES)
    assert any(s[0] > 1 for s in shapes)


def read_all(folder):
    cache = open_cache(folder)
    return cache.metadata, [cache[i] for i in range(len(cache))]


def test_resume_after_a_crash_equals_an_uninterrupted_build(dataset, tmp_path):
    clean_encoder = PoolingEncoder()
    build(dataset, tmp_path / "clean", clean_encoder)

    with pytest.raises(RuntimeError, match="injected crash"):
        build(dataset, tmp_path / "resumed", PoolingEncoder(fail_at=5))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        open_cache(tmp_path / "resumed")
    assert not list((tmp_path / "resumed").glob(".*")), "a temporary file was left behind"
    resumed_encoder = PoolingEncoder()
    build(dataset, tmp_path / "resumed", resumed_encoder)
    assert 0 < resumed_encoder.calls < clean_encoder.calls  # finished shards were kept

    clean_metadata, clean_items = read_all(tmp_path / "clean")
    resumed_metadata, resumed_items = read_all(tmp_path / "resumed")
    assert json.dumps(resumed_metadata).replace("resumed", "clean") == json.dumps(clean_metadata)
    for clean, resumed in zip(clean_items, resumed_items, strict=True):
        assert clean.keys() == resumed.keys()
        for key in clean:
            np.testing.assert_array_equal(resumed[key], clean[key])


def test_a_rerun_with_other_settings_is_refused(dataset, tmp_path):
    build(dataset, tmp_path / "cache", shard_size=100)
    with pytest.raises(ValueError, match="image_size: 64 then, 32 now"):
        build(dataset, tmp_path / "cache", image_size=32, shard_size=100)


def test_examples_without_a_caption_are_refused_before_anything_is_written(dataset, tmp_path):
    uncaptioned = [dataclasses.replace(e, prompt=None) for e in read_manifest(dataset)]
    for examples in ([], uncaptioned):
        with pytest.raises(ValueError, match=rf"cache {tmp_path / 'cache'}: no example to train on: {len(examples)} "):
            build_cache(
                examples,
                tmp_path / "cache",
                encode_images=PoolingEncoder(),
                encode_text=hash_text,
                image_size=IMAGE_SIZE,
            )
    assert not (tmp_path / "cache").exists()


def test_a_data_set_of_unusable_images_writes_no_cache(dataset, tmp_path):
    """Every image corrupt, missing or too small: the build says so and the cache never reads as complete."""
    unusable = [e for e in read_manifest(dataset) if Path(e.image).name in ("corrupt.png", "missing.png", "tiny.png")]
    with pytest.raises(ValueError, match=r"none of the 3 images could be used \(the first, .*train.jsonl:4: OSError"):
        build_cache(
            unusable,
            tmp_path / "cache",
            encode_images=PoolingEncoder(),
            encode_text=hash_text,
            image_size=IMAGE_SIZE,
            progress=False,
        )
    with pytest.raises(FileNotFoundError):
        open_cache(tmp_path / "cache")


def test_open_cache_without_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training cache"):
        open_cache(tmp_path)


def test_batches_have_one_latent_shape_and_the_run_s_caption_bucket(cache):
    iterator = make_batches(cache, global_batch_size=2, seed=0)
    longest = 64  # the bucket of the cache's longest caption (one is past 32 tokens), in every batch
    for _ in range(12):
        batch = next(iterator)
        latents, caption, mask = batch["latents"], batch["caption"], batch["caption_mask"]
        assert latents.dtype == caption.dtype == np.float32 and mask.dtype == bool
        assert latents.shape[:2] == (2, 3) and caption.shape == (2, longest, 6) and mask.shape == (2, longest)
        lengths = mask.sum(axis=1)
        assert (mask == (np.arange(longest) < lengths[:, None])).all()
        assert (caption[~mask] == 0).all() and (caption[mask] != 0).all()


@pytest.mark.parametrize("transformer", [NextDiTConfig(), FlagDiTConfig()], ids=["next-dit", "flag-dit"])
def test_token_batches_have_the_run_s_one_shape(cache, transformer):
    shape = BatchShape.of(cache, transformer)
    p = transformer.patch_size
    tokens = [transformer.sequence_length(h // p, w // p) for _, h, w in cache.latent_shapes]
    assert shape.image_tokens == max(tokens) and len(set(tokens)) > 1 and shape.caption_tokens == 64
    assert shape.image_padding == pytest.approx(1 - np.mean(tokens) / max(tokens))
    iterator = make_batches(cache, global_batch_size=2, seed=0, tokens=transformer)
    batches = [next(iterator) for _ in range(12)]
    assert {b.patches.shape[1] for b in batches} == {shape.image_tokens}
    assert {b.caption.shape[1] for b in batches} == {shape.caption_tokens}
    assert {int(b.loss_mask.sum()) for b in batches} != {2 * shape.image_tokens}  # some are padded


def test_an_epoch_uses_each_example_at_most_once_in_one_shape_batches(cache):
    plan = BatchPlan(cache.latent_shapes, 2, seed=3)
    per_shape = {}
    for shape in cache.latent_shapes:
        per_shape[shape] = per_shape.get(shape, 0) + 1
    assert plan.batches_per_epoch == sum(n // 2 for n in per_shape.values())
    epoch = [plan(step) for step in range(plan.batches_per_epoch)]
    used = np.concatenate(epoch)
    assert len(set(used.tolist())) == len(used)
    assert all(len({cache.latent_shapes[i] for i in batch}) == 1 for batch in epoch)
    next_epoch = [plan(step) for step in range(plan.batches_per_epoch, 2 * plan.batches_per_epoch)]
    assert not all(np.array_equal(a, b) for a, b in zip(epoch, next_epoch))


def test_latents_are_scaled_posterior_samples(cache):
    plan = BatchPlan(cache.latent_shapes, 2, seed=0)
    noise = []
    for step in range(250):
        batch = load_batch(cache, plan, step, slice(None))
        for row, index in enumerate(plan(step)):
            item = cache[int(index)]
            sample = batch["latents"][row] / SCALE + SHIFT
            noise.append(((sample - item["mean"]) / np.exp(0.5 * item["logvar"])).ravel())
    noise = np.concatenate(noise)
    assert len(noise) > 70_000
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    assert abs(np.mean(noise**4) - 3) < 0.15  # Gaussian (uniform noise gives 1.8), not merely unit variance
    again = load_batch(cache, plan, 0, slice(None))["latents"]
    np.testing.assert_array_equal(again, load_batch(cache, plan, 0, slice(None))["latents"])


def test_latents_are_the_scaled_posterior_means_when_asked(cache):
    """posterior="mean": Lumina-Image 2.0's trainer takes `latent_dist.mode()`, the mean, unscaled and unshifted."""
    plan = BatchPlan(cache.latent_shapes, 2, seed=0)
    iterator = make_batches(cache, global_batch_size=2, seed=0, posterior="mean")
    for step in range(4):
        latents = next(iterator)["latents"]
        for row, index in enumerate(plan(step)):
            expected = (cache[int(index)]["mean"] - cache.shift_factor) * cache.scaling_factor
            np.testing.assert_array_equal(latents[row], expected.astype(np.float32))


def test_token_batches_carry_their_latents_pooled_in_the_run_s_one_shape(cache):
    """pooled_by: every batch's latents average-pooled (for the pooled loss) in one token shape of their own;
    the full-size tokens are those of the run without it."""
    transformer = NextDiTConfig()
    shape = BatchShape.of(cache, transformer, pooled_by=2)
    pooled_sizes = [pooled_latent_size(h, w, 2, 2) for _, h, w in cache.latent_shapes]
    tokens = [(h // 2) * (w // 2) for h, w in pooled_sizes]
    assert shape.pooled_image_tokens == max(tokens) and len(set(tokens)) > 1
    assert shape.pooled_image_padding == pytest.approx(1 - np.mean(tokens) / max(tokens))
    assert dataclasses.replace(shape, pooled_image_tokens=0, pooled_image_padding=0.0) == BatchShape.of(
        cache, transformer
    )
    plan = BatchPlan(cache.latent_shapes, 2, seed=0)
    pooled = make_batches(cache, global_batch_size=2, seed=0, tokens=transformer, pooled_by=2)
    plain = make_batches(cache, global_batch_size=2, seed=0, tokens=transformer)
    for step in range(8):
        batch, expected = next(pooled), next(plain)
        np.testing.assert_array_equal(batch.patches, expected.patches)
        assert batch.pooled.patches.shape[1] == shape.pooled_image_tokens and batch.pooled.caption is None
        real = [tokens[int(index)] for index in plan(step)]
        assert batch.pooled.token_mask.sum(axis=1).tolist() == real
    with pytest.raises(ValueError, match=r"pooled_loss_factor=4: latents of shape \(4, 12\), \(6, 8\)"):
        BatchShape.of(cache, transformer, pooled_by=4)  # 4 or 6 rows pool to 1: no 2x2 patch


def test_pixel_space_latents_are_the_scaled_images(dataset, tmp_path):
    encode_images, _, scale, shift = pipeline_encoders(SimpleNamespace(vae=None, encode_prompt=None))
    assert (scale, shift) == (1.0, 0.0)
    build(dataset, tmp_path / "pixels", encode_images, scaling_factor=2.0, shift_factor=0.5)
    cache = open_cache(tmp_path / "pixels")
    assert "logvar" not in cache[0]
    plan = BatchPlan(cache.latent_shapes, 2, seed=0)
    batch = load_batch(cache, plan, 0, slice(None))
    for row, index in enumerate(plan(0)):
        mean = cache[int(index)]["mean"]
        assert mean.shape[1:] == tuple(cache.records[int(index)]["crop"])
        np.testing.assert_array_equal(batch["latents"][row], (mean - 0.5) * 2.0)


@pytest.mark.parametrize("transformer", [NextDiTConfig(), FlagDiTConfig()], ids=["next-dit", "flag-dit"])
def test_token_batches_are_assembled_on_the_host_with_the_values_jax_gives(cache, transformer):
    def assert_same_tokens(got, expected):
        assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(got))  # no device: never waits on one
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        for ours, theirs in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            assert ours.dtype == theirs.dtype
            np.testing.assert_array_equal(ours, theirs)

    def on_device(latents, caption, mask, length=None):  # the batch as JAX assembles it
        return TrainBatch.from_latents([jnp.asarray(x) for x in latents], caption, mask, transformer, length)

    plan = BatchPlan(cache.latent_shapes, 2, seed=0)
    iterator = make_batches(cache, global_batch_size=2, seed=0, tokens=transformer)
    length = BatchShape.of(cache, transformer).image_tokens
    for step in range(4):
        batch = load_batch(cache, plan, step, slice(None))
        expected = on_device(batch["latents"], batch["caption"], batch["caption_mask"], length)
        assert_same_tokens(next(iterator), expected)

    # Images of two sizes, padded; under the guard any JAX operation (it would go through a device) raises.
    latents = [load_batch(cache, plan, step, slice(None))["latents"][0] for step in range(6)]
    latents = [latents[0], *[x for x in latents if x.shape != latents[0].shape][:1]]
    assert len({x.shape for x in latents}) == 2
    caption, mask = np.ones((2, 3, 4), np.float32), np.array([[True, True, False]] * 2)
    with jax.transfer_guard("disallow"):
        host = TrainBatch.from_latents(latents, caption, mask, transformer)
    assert_same_tokens(host, on_device(latents, caption, mask))


def test_the_next_batch_is_ready_while_the_step_before_it_runs(cache):
    """The loop's batch n + 1 (`make_batches` then `loop.global_batch`) arrives while step n still runs:
    nothing in it waits for the device. Assembled with jnp, as before, it queued behind the step."""
    iterator = make_batches(cache, global_batch_size=2, seed=0, tokens=NextDiTConfig())
    mesh = sharding.make_mesh(devices=jax.devices()[:1])

    @jax.jit
    def step(batch, x):  # a training step's stand-in: seconds of matmuls on the batch's device
        x = x + jnp.mean(batch.patches)
        return jax.lax.fori_loop(0, 400, lambda i, x: jnp.tanh(x @ x), x).sum()

    x = jnp.full((512, 512), 1e-3)
    step(global_batch(next(iterator), mesh), x).block_until_ready()  # compiled, and Grain's prefetch filled
    running = step(global_batch(next(iterator), mesh), x)
    following = global_batch(next(iterator), mesh)
    assert not running.is_ready(), "batch n + 1 waited for step n"
    following.patches.block_until_ready()
    running.block_until_ready()


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_are_deterministic_and_depend_on_the_seed(cache):
    first = take(make_batches(cache, global_batch_size=2, seed=5, num_threads=3), 8)
    assert_same_batches(take(make_batches(cache, global_batch_size=2, seed=5, num_threads=1), 8), first)
    other = take(make_batches(cache, global_batch_size=2, seed=6), 8)
    assert not all(
        np.array_equal(a["latents"], b["latents"])
        for a, b in zip(first, other)
        if a["latents"].shape == b["latents"].shape
    )


def test_restored_iterator_continues_exactly(cache):
    straight = take(make_batches(cache, global_batch_size=2, seed=1), 20)  # past one epoch
    interrupted = make_batches(cache, global_batch_size=2, seed=1)
    take(interrupted, 7)
    state = json.loads(json.dumps(interrupted.get_state()))
    restored = make_batches(cache, global_batch_size=2, seed=1)
    restored.set_state(state)
    assert_same_batches(take(restored, 13), straight[7:])


def test_process_slices_tile_the_global_batch(cache):
    global_batch = 4
    whole = take(make_batches(cache, global_batch_size=global_batch, seed=2), 6)
    hosts = [
        take(make_batches(cache, global_batch_size=global_batch, seed=2, process_index=p, process_count=2), 6)
        for p in range(2)
    ]
    for step, batch in enumerate(whole):
        parts = [hosts[p][step] for p in range(2)]
        assert all(part["latents"].shape[0] == 2 for part in parts)
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), batch[key])


def test_batch_errors(cache):
    with pytest.raises(ValueError, match="no latent-shape bucket holds a full global batch of 64"):
        make_batches(cache, global_batch_size=64, seed=0)
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_batches(cache, global_batch_size=3, seed=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        make_batches(cache, global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="unknown posterior 'mode'"):
        make_batches(cache, global_batch_size=2, seed=0, posterior="mode")
    with pytest.raises(ValueError, match="give the transformer's config as tokens"):
        make_batches(cache, global_batch_size=2, seed=0, pooled_by=4)


class TinyVae(nnx.Module):
    """Stands in for the VAE (whose init alone takes ~20 s here): a pointwise projection to (mean, logvar)
    at half resolution, reading [B, 3, H, W] as AutoencoderKL.encode does."""

    def __init__(self):
        self.config = AutoencoderKLConfig(scaling_factor=0.25, shift_factor=None)
        self.projection = nnx.Linear(3, 8, rngs=nnx.Rngs(0))

    def encode(self, images):
        moments = self.projection(images.transpose(0, 2, 3, 1)[:, ::2, ::2]).transpose(0, 3, 1, 2)
        return moments[:, :4], moments[:, 4:]


def test_pipeline_encoders_use_the_vae_posterior_and_the_training_captions():
    vae = TinyVae()
    features, mask = hash_text(["caption: a red fox", "caption: a cat"])
    pipe = SimpleNamespace(
        vae=vae,
        text_encoder=SimpleNamespace(
            config=SimpleNamespace(training_captions=lambda texts: [f"caption: {t}" for t in texts])
        ),
        encode_texts=lambda texts: (jnp.asarray(hash_text(texts)[0]), jnp.asarray(hash_text(texts)[1])),
    )
    encode_images, encode_text, scale, shift = pipeline_encoders(pipe)
    assert (scale, shift) == (0.25, 0.0)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 24, 3)).astype(np.float32)  # padded to 4
    mean, logvar = encode_images(images)
    expected_mean, expected_logvar = vae.encode(jnp.asarray(images.transpose(0, 3, 1, 2)))
    assert mean.shape == logvar.shape == (3, 4, 8, 12)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logvar, expected_logvar, rtol=1e-6, atol=1e-6)
    got_features, got_mask = encode_text(["a red fox", "a cat"])
    np.testing.assert_array_equal(got_features, features)
    assert got_mask.dtype == bool and (got_mask == mask).all()


def test_each_plan_caches_its_own_epochs_and_is_freed_with_its_iterator():
    shapes = [(4, 2, 2)] * 8
    plan, other = BatchPlan(shapes, 2, seed=0), BatchPlan(shapes, 2, seed=1)
    first = plan(0)
    for step in range(0, 40, 4):  # ten epochs of the other plan
        other(step)
    assert plan.epoch.cache_info().currsize == 1 and plan(0) is first  # not evicted by the other plan's epochs
    freed = weakref.ref(plan)
    del plan
    gc.collect()
    assert freed() is None

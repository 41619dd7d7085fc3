"""End to end against diffusers' LuminaPipeline: tiny random components in the released folder layout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from reference import compilations, random_pipeline, relative_error

from lumina_jax import sampling
from lumina_jax.cli.convert import main as convert_main
from lumina_jax.cli.sample import main as sample_main
from lumina_jax.pipeline import LuminaPipeline as OurPipeline
from lumina_jax.pipeline import caption_bucket
from lumina_jax.weights.vae import load_vae

PROMPTS = ["A red fox in the snow", "an astronaut riding a horse on the moon, highly detailed"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    reference = random_pipeline(
        folder, corpus=PROMPTS + ["a photo of a cat", "the quick brown fox jumps over the lazy dog"]
    )
    return reference, OurPipeline.from_pretrained(folder, dtype="float32", progress=False)


CASES = {
    "square_cfg": dict(height=128, width=128, guidance_scale=4.0),
    "wide_no_cfg": dict(height=128, width=192, guidance_scale=1.0),
    "extrapolated_watershed": dict(height=192, width=256, guidance_scale=3.0, scaling_watershed=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_latents_and_images_match_diffusers(pipelines, case):
    reference, ours = pipelines
    kwargs = dict(prompt=PROMPTS, num_inference_steps=4, **CASES[case])
    shape = (2, 4, kwargs["height"] // 8, kwargs["width"] // 8)
    latents = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    expected = reference(latents=torch.from_numpy(latents), output_type="latent", **kwargs).images.numpy()
    got = ours(latents=latents, output_type="latent", **kwargs).images
    assert relative_error(got, expected) <= 1e-4
    expected_images = reference(latents=torch.from_numpy(latents), output_type="np", **kwargs).images
    got_images = ours(latents=latents, output_type="np", **kwargs).images
    assert np.abs(got_images - expected_images).max() <= 2 / 255


def test_num_images_per_prompt_keeps_masks_with_their_prompts(pipelines):
    _, ours = pipelines
    latents = np.random.default_rng(1).standard_normal((4, 4, 16, 16), dtype=np.float32)
    both = ours(
        prompt=PROMPTS, num_images_per_prompt=2, latents=latents, num_inference_steps=2, output_type="latent"
    ).images
    for i, prompt in enumerate(PROMPTS):
        alone = ours(
            prompt=prompt,
            num_images_per_prompt=2,
            latents=latents[2 * i : 2 * i + 2],
            num_inference_steps=2,
            output_type="latent",
        ).images
        assert relative_error(both[2 * i : 2 * i + 2], alone) <= 1e-5


def test_an_image_depends_on_its_own_prompt_negative_and_seed_only(pipelines):
    """Per-image seeds draw each image's noise as its seed does alone, and each negative prompt is cut
    to its own prompt's length (diffusers would cut this negative to the longer prompt's 16 tokens)."""
    _, ours = pipelines
    negative = "a photo of a cat the quick brown fox jumps over the lazy dog"
    settings = dict(num_inference_steps=2, output_type="latent", guidance_scale=4.0)
    alone = ours(prompt=PROMPTS[0], negative_prompt=negative, seed=7, **settings).images
    batch = ours(prompt=[PROMPTS[0], PROMPTS[1]], negative_prompt=[negative, ""], seed=[7, 9], **settings).images
    assert relative_error(batch[:1], alone) <= 1e-5
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        ours(prompt=PROMPTS[0], num_images_per_prompt=3, seed=[1, 2], **settings)


def test_new_prompt_seed_or_guidance_does_not_recompile(pipelines):
    _, ours = pipelines
    ours(prompt="a photo of a cat", num_inference_steps=2, output_type="latent", seed=0)
    with compilations() as compiles:
        for kwargs in (
            dict(seed=1),
            dict(guidance_scale=7.5),
            dict(prompt="the quick brown fox jumps over the lazy dog"),
        ):
            ours(**{"prompt": "a photo of a cat", "num_inference_steps": 2, "output_type": "latent", **kwargs})
        assert compiles == []
        ours(prompt="a photo of a cat", num_inference_steps=3, output_type="latent")  # a new shape does compile
        assert compiles


def test_offloaded_text_encoder_gives_the_same_latents(pipelines):
    _, ours = pipelines
    latents = np.random.default_rng(4).standard_normal((2, 4, 16, 16), dtype=np.float32)
    kwargs = dict(prompt=PROMPTS, latents=latents, num_inference_steps=2, output_type="latent")
    expected = ours(**kwargs).images
    text_encoder = nnx.clone(ours.text_encoder)  # offloading moves the module's own weights
    offloaded = OurPipeline(ours.transformer, text_encoder, ours.vae, ours.tokenizer).offload_text_encoder()
    np.testing.assert_array_equal(offloaded(**kwargs).images, expected)
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(nnx.state(offloaded.text_encoder))}
    assert kinds == {"pinned_host"}  # between calls, the weights wait in host memory


def test_pil_output(pipelines):
    _, ours = pipelines
    images = ours(prompt=PROMPTS[0], height=128, width=192, num_inference_steps=2).images
    assert len(images) == 1 and images[0].size == (192, 128) and images[0].mode == "RGB"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=120), "multiples of 16"),
        (dict(width=6160), "between 16 and 6144 px"),
        (dict(prompt=[]), "empty list"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
        (dict(solver="rk45"), "unknown solver"),
        (dict(schedule="cosine"), "unknown schedule"),
    ],
)
def test_bad_input(pipelines, kwargs, message):
    _, ours = pipelines
    with pytest.raises(ValueError, match=message):
        ours(**{"prompt": "a cat", "num_inference_steps": 2, "output_type": "latent", **kwargs})


def test_a_long_prompt_warns_and_truncates(pipelines, caplog):
    _, ours = pipelines
    with caplog.at_level("WARNING"):
        ours(prompt=" ".join(["fox"] * 300), num_inference_steps=1, output_type="latent")
    assert "truncated" in caplog.text


def test_missing_components(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing text_encoder/, vae/, tokenizer/"):
        OurPipeline.from_pretrained(tmp_path)


def test_vae_dtype_sets_the_vae_alone(pipelines, tmp_path):
    """vae_dtype="bfloat16": the same latents, decoded by a bfloat16 VAE (whose accuracy tests/test_vae.py bounds)."""
    reference, ours = pipelines
    reference.save_pretrained(tmp_path)
    low_memory = OurPipeline.from_pretrained(tmp_path, dtype="float32", vae_dtype="bfloat16", progress=False)
    assert low_memory.vae.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
    assert low_memory.transformer.layers.attention.to_q.kernel[...].dtype == jnp.float32
    settings = dict(prompt=PROMPTS[0], num_inference_steps=2, seed=3)
    latents = low_memory(**settings, output_type="latent").images
    np.testing.assert_array_equal(latents, ours(**settings, output_type="latent").images)
    vae = load_vae(tmp_path / "vae", "bfloat16", progress=False)
    decoded = nnx.jit(lambda vae, z: vae.decode(z))(vae, jnp.asarray(latents) / vae.config.scaling_factor)
    expected = np.clip(np.asarray(decoded, np.float32) * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(low_memory(**settings, output_type="np").images, expected)


def test_converted_pipeline_gives_the_same_latents(pipelines, tmp_path):
    reference, ours = pipelines
    source = tmp_path / "diffusers"
    reference.save_pretrained(source)
    assert convert_main([str(source), str(tmp_path / "converted")]) == 0
    for name in ("transformer", "text_encoder", "vae"):
        assert (tmp_path / "converted" / name / "params").is_dir()
    converted = OurPipeline.from_pretrained(tmp_path / "converted", dtype="float32", progress=False)
    settings = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="latent", seed=3)
    np.testing.assert_array_equal(converted(**settings).images, ours(**settings).images)


def test_sample_command_writes_pngs_with_their_settings(pipelines, tmp_path, capsys):
    reference, _ = pipelines
    reference.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nA red fox in the snow\n")
    args = [
        "--model",
        str(tmp_path / "model"),
        "--prompts-file",
        str(prompts),
        "--height",
        "128",
        "--width",
        "160",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--seed",
        "5",
        "--dtype",
        "float32",
        "--out",
        str(tmp_path / "out"),
    ]
    assert sample_main(args) == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000_5.png", "00000_6.png", "00001_5.png", "00001_6.png"]
    image = Image.open(files[3])
    assert image.size == (160, 128)
    assert image.text["prompt"] == "A red fox in the snow" and image.text["seed"] == "6"
    assert json.loads(image.text["parameters"])["steps"] == 2
    assert "wrote 4 image(s)" in capsys.readouterr().out


def test_one_caption_bucketing_for_sampling_and_training():
    assert [caption_bucket(n) for n in (1, 32, 33, 64, 65, 129, 256)] == [32, 32, 64, 64, 128, 256, 256]
    with pytest.raises(ValueError, match="at most 256 tokens"):
        caption_bucket(257)


def test_the_shifted_schedule_keeps_its_shift_of_4_on_a_diffusers_folder(pipelines, monkeypatch):
    """The scheduler config's shift (3 here) is the diffusers schedule's; schedule="shifted" on Lumina-Next
    shifts by 4, as the README and the original demo say, unless shift= is given."""
    _, ours = pipelines
    monkeypatch.setattr(ours, "scheduler_shift", 3.0)
    used = []
    monkeypatch.setattr(
        sampling, "sample", lambda model, latents, caption, mask, schedule, **_: used.append(schedule) or latents
    )
    settings = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="latent")
    ours(schedule="shifted", **settings)
    ours(schedule="shifted", shift=2.0, **settings)
    ours(**settings)
    expected = [
        sampling.shifted_schedule(3, shift=4.0),
        sampling.shifted_schedule(3, shift=2.0),
        sampling.diffusers_schedule(3, shift=3.0),
    ]
    for got, want in zip(used, expected, strict=True):
        np.testing.assert_array_equal(got.times, want.times)
        np.testing.assert_array_equal(got.steps, want.steps)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(seed=-1), ValueError, "seed must be an integer from 0 to 4294967295, or a list of one per image, got -1"),
        (dict(seed=2**32), ValueError, "seed must be an integer from 0 to 4294967295"),
        (dict(seed="3"), ValueError, "seed must be an integer from 0 to 4294967295"),
        (dict(prompt=123), TypeError, "prompt must be a string or a list of strings, got 123"),
        (dict(negative_prompt=["a dog", None]), TypeError, "negative_prompt must be a string or a list of strings"),
        (dict(prompt="a cat \udcff"), ValueError, r"prompt 'a cat \\udcff' is not UTF-8 text"),
        (dict(height="32"), TypeError, "height and width must be whole numbers of pixels, got '32' and 128"),
        (dict(context_drop=3), ValueError, r"context_drop must divide both sides of the 8x8 token grid .* got 3"),
        (dict(image="missing.png"), ValueError, "image 'missing.png': not a picture PIL can read"),
    ],
)
def test_bad_arguments_are_refused_up_front(pipelines, kwargs, error, message):
    _, ours = pipelines
    with pytest.raises(error, match=message):
        ours(**{"prompt": "a cat", "num_inference_steps": 2, "output_type": "latent", **kwargs})


def test_image_may_be_a_file_name(pipelines, tmp_path):
    _, ours = pipelines
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (128, 128, 3), np.uint8))
    picture.save(tmp_path / "picture.png")
    settings = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="latent", strength=0.5)
    expected = ours(image=picture, **settings).images
    np.testing.assert_array_equal(ours(image=str(tmp_path / "picture.png"), **settings).images, expected)
    np.testing.assert_array_equal(ours(image=[tmp_path / "picture.png"], **settings).images, expected)

"""Image-to-image, as the original Lumina-Next's sample_img2img.py: its time grid cut by strength and start state
(fixtures/lumina_next_img2img.npz, written by the original transport.py), the ends (strength 1 is text-to-image,
0 the input's VAE round trip, checked against diffusers' VAE), and the compiled-loop discipline."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import compilations, random_pipeline

from lumina_jax.assets import DIGITS_MODEL
from lumina_jax.cli.sample import main as sample_main
from lumina_jax.pipeline import LuminaPipeline, _noise, load_image
from lumina_jax.sampling import FlowSchedule, SamplerOptions, sample, shifted_schedule, start_from_image

FIXTURE = Path(__file__).parent / "fixtures" / "lumina_next_img2img.npz"
PROMPTS = ["A red fox in the snow", "an astronaut riding a horse"]
FLOAT32_ROUNDING = 2e-7  # the grid is ours in float64 rounded once, the original's torch.linspace in float32


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    reference = random_pipeline(folder, corpus=PROMPTS + ["a photo of a cat"])
    return reference, LuminaPipeline.from_pretrained(folder, dtype="float32", progress=False)


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth colour image: gradients and a disc, so a VAE round trip has something to keep."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    disc = ((y - 0.5) ** 2 + (x - 0.4) ** 2 < 0.08).astype(float)
    channels = [x, y, np.roll(disc, seed, axis=1)]
    return Image.fromarray((np.stack(channels, axis=-1) * 255).round().astype(np.uint8))


@pytest.mark.parametrize("case", range(7))
def test_grid_cut_and_start_state_as_the_original(case):
    original = np.load(FIXTURE)
    points, shift, strength = original[f"case_{case}"]
    schedule = shifted_schedule(int(points) - 1, shift=shift)  # the original's grid of N points is N - 1 steps
    first, t0 = schedule.image_to_image_start(strength)
    grid = np.append(schedule.times, schedule.times[-1] + schedule.steps[-1])[first:]
    expected = original[f"grid_{case}"]
    if len(expected) == 0:  # strength 0: the original has no grid left; here no step, the image itself (t0 = 1)
        assert first == len(schedule.times) and t0 == 1.0
        return
    assert len(grid) == len(expected) and first == int(points) - len(expected)
    np.testing.assert_allclose(grid, expected, rtol=0, atol=FLOAT32_ROUNDING)
    start = start_from_image(original["noise"], original["x1"], t0)
    np.testing.assert_allclose(start, original[f"start_{case}"], rtol=0, atol=2 * FLOAT32_ROUNDING)


def test_starting_part_way_equals_sampling_the_cut_grid(pipelines):
    """The traced first step (one program for every strength) against a schedule of only the remaining steps."""
    _, ours = pipelines
    schedule = shifted_schedule(6, shift=4.0)
    first, t0 = schedule.image_to_image_start(0.5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    caption = rng.standard_normal((2, 4, 32), dtype=np.float32)
    mask = np.ones((2, 4), np.int32)
    cut = FlowSchedule(schedule.times[first:], schedule.steps[first:])
    expected = sample(ours.transformer, x, caption, mask, cut, SamplerOptions(scaling_watershed=1.0))
    np.testing.assert_array_equal(
        sample(ours.transformer, x, caption, mask, schedule, SamplerOptions(scaling_watershed=1.0, first_step=first)),
        expected,
    )
    assert first == 3 and t0 == pytest.approx(schedule.times[3])


def test_strength_one_is_text_to_image(pipelines):
    _, ours = pipelines
    kwargs = dict(prompt=PROMPTS, height=64, width=96, num_inference_steps=3, seed=[4, 5], output_type="latent")
    with_image = ours(image=photo(64, 96), strength=1.0, **kwargs).images
    np.testing.assert_array_equal(with_image, ours(**kwargs).images)


def test_strength_zero_is_the_vae_round_trip(pipelines):
    """No step taken: the image's posterior sample decoded, as diffusers' AutoencoderKL computes it."""
    reference, ours = pipelines
    image = photo(64, 64)
    got = ours(prompt=PROMPTS[0], image=image, strength=0.0, seed=3, num_inference_steps=4, output_type="np").images
    pixels = torch.from_numpy(load_image(image, 64, 64)[None])
    noise = torch.from_numpy(np.array(_noise(np.uint32(3), (1, 4, 8, 8), 1)))
    with torch.no_grad():
        posterior = reference.vae.encode(pixels).latent_dist
        expected = reference.vae.decode(posterior.mean + posterior.std * noise).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    assert np.abs(got - expected).max() <= 1 / 255


def test_a_new_strength_or_image_does_not_recompile(pipelines):
    _, ours = pipelines
    kwargs = dict(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=3, output_type="latent")
    ours(image=photo(64, 64), strength=0.6, **kwargs)
    with compilations() as compiles:
        for strength, seed in ((0.3, 0), (0.9, 1), (1.0, 2)):
            ours(image=photo(64, 64, seed=seed), strength=strength, **kwargs)
    assert compiles == []


def test_sizes_and_bad_input(pipelines):
    _, ours = pipelines
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=1, output_type="latent")
    assert ours(image=photo(48, 80), **kwargs).images.shape == (1, 4, 6, 10)  # the image's own size
    assert ours(image=photo(50, 70), height=32, width=48, **kwargs).images.shape == (1, 4, 4, 6)  # resized
    with pytest.raises(ValueError, match="got 50x70; pass height= and width= to resize the image"):
        ours(image=photo(50, 70), **kwargs)
    with pytest.raises(ValueError, match="strength must be between 0 and 1, got 1.5"):
        ours(image=photo(48, 48), strength=1.5, **kwargs)
    with pytest.raises(ValueError, match="strength is for image-to-image"):
        ours(strength=0.5, **kwargs)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        ours(image=[photo(48, 48)] * 3, **{**kwargs, "prompt": PROMPTS})
    with pytest.raises(ValueError, match=r"array \[height, width, 3\], got shape \(48, 48\)"):
        ours(image=np.zeros((48, 48)), **kwargs)


def test_sample_command_draws_from_an_image(pipelines, tmp_path, capsys):
    reference, ours = pipelines
    reference.save_pretrained(tmp_path / "model")
    photo(64, 96).save(tmp_path / "input.png")
    args = ["--model", str(tmp_path / "model"), "--prompt", PROMPTS[0], "--steps", "3", "--dtype", "float32"]
    assert (
        sample_main([*args, "--image", str(tmp_path / "input.png"), "--strength", "0.5", "--out", str(tmp_path)]) == 0
    )
    written = Image.open(tmp_path / "00000_0.png")
    assert written.size == (96, 64) and written.text["image"] == str(tmp_path / "input.png")
    expected = ours(prompt=PROMPTS[0], image=photo(64, 96), strength=0.5, num_inference_steps=3, output_type="np")
    assert np.abs(np.asarray(written, np.float32) / 255 - expected.images[0]).max() <= 1 / 255
    with pytest.raises(SystemExit, match="2"):
        sample_main([*args, "--strength", "0.5", "--out", str(tmp_path)])
    assert "--strength needs --image" in capsys.readouterr().err
    photo(50, 70).save(tmp_path / "odd.png")
    assert sample_main([*args, "--image", str(tmp_path / "odd.png"), "--out", str(tmp_path)]) == 2
    assert "--image is 70x50: give --height and --width to resize it" in capsys.readouterr().err


def test_in_pixel_space_the_picture_is_the_latent():
    """The shipped digits model (grey pixels, no VAE): strength 0 returns the picture in grey, as trained."""
    pipe = LuminaPipeline.from_pretrained(DIGITS_MODEL, dtype="float32", progress=False)
    picture = photo(32, 32)
    got = pipe(prompt="a handwritten digit eight", image=picture, strength=0.0, output_type="np").images[0]
    grey = load_image(picture, 32, 32).mean(axis=0) * 0.5 + 0.5
    np.testing.assert_allclose(got, np.repeat(grey[..., None], 3, axis=-1), rtol=0, atol=1e-6)
    moved = pipe(prompt="a handwritten digit eight", image=picture, strength=0.6, output_type="np").images[0]
    assert np.abs(moved - got).max() > 0.1

"""The sampler's options as one hashable value whose defaults live in it alone, and the pipeline's stages
(check, encode, prepare latents, sample, decode), each usable alone, composing to what a call draws."""

import dataclasses
import functools
import inspect

import jax
import numpy as np
import pytest
from PIL import Image
from reference import compilations, random_pipeline

from lumina_jax import sampling
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.sampling import SamplerOptions

PROMPTS = ["A red fox in the snow", "an astronaut riding a horse"]
FIELDS = {field.name for field in dataclasses.fields(SamplerOptions)}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    random_pipeline(folder, corpus=PROMPTS)
    return LuminaPipeline.from_pretrained(folder, dtype="float32", progress=False)


def test_options_are_a_hashable_value_and_a_static_jit_argument():
    options = SamplerOptions(sigmas=[1.0, 0.5], solver="midpoint")  # sigmas as diffusers takes them, a list
    same = SamplerOptions(sigmas=(1.0, 0.5), solver="midpoint")
    assert options == same and hash(options) == hash(same) and len({options, same}) == 1
    assert options != dataclasses.replace(options, guidance_scale=7.5)

    @functools.partial(jax.jit, static_argnames="options")
    def guided(x, options):
        return x * options.guidance_scale if options.guided else x

    with compilations() as compiles:
        assert float(guided(np.float32(2.0), options=options)) == 8.0
        assert float(guided(np.float32(3.0), options=same)) == 12.0
        assert len(compiles) == 1  # equal options: the same program
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        SamplerOptions(solver="rk45")


def test_the_defaults_live_in_the_options_alone(pipe):
    """No entry point restates an option's default (sample's schedule is the FlowSchedule, given); a call
    without options samples with `SamplerOptions()`, the family's schedule and watershed filled in."""
    for entry in (LuminaPipeline.__call__, LuminaPipeline.lower, sampling.sample, sampling.lower_sample):
        parameters = inspect.signature(entry).parameters.values()
        assert not [p.name for p in parameters if p.name in FIELDS and p.default is not p.empty], entry.__qualname__
    settings = dict(prompt=PROMPTS[0], height=64, width=64, seed=5, output_type="latent")
    got = pipe(**settings).images
    schedule, resolved = pipe._schedule(SamplerOptions())
    assert len(schedule.times) == 30 and resolved.scaling_watershed == 1.0  # Lumina-Next's, as diffusers'
    conditioning = pipe.encode_captions(PROMPTS[0], guided=resolved.guided)
    latents, _ = pipe.prepare_latents(1, 64, 64, seed=5)
    expected = sampling.sample(pipe.transformer, latents, *conditioning[:2], schedule, resolved)
    np.testing.assert_array_equal(got, expected)
    by_name = pipe(**settings, num_inference_steps=2, guidance_scale=1.0).images
    given = pipe(**settings, options=SamplerOptions(num_inference_steps=2, guidance_scale=1.0)).images
    overridden = pipe(
        **settings, options=SamplerOptions(num_inference_steps=7), num_inference_steps=2, guidance_scale=1
    )
    np.testing.assert_array_equal(given, by_name)
    np.testing.assert_array_equal(overridden.images, by_name)


def test_each_stage_alone_reproduces_a_call(pipe):
    options = SamplerOptions(num_inference_steps=2, guidance_scale=4.0)
    seeds = [1, 2, 3, 4]
    pipe.check_inputs(PROMPTS, None, 64, 64, options=options, num_images_per_prompt=2, seed=seeds)
    conditioning = pipe.encode_captions(PROMPTS, guided=options.guided, num_images_per_prompt=2)
    latents, start = pipe.prepare_latents(4, 64, 64, seed=seeds, options=options)
    images = pipe.decode(pipe.sample(latents, conditioning, start), output_type="np")
    expected = pipe(
        PROMPTS, height=64, width=64, num_images_per_prompt=2, seed=seeds, output_type="np", options=options
    )
    np.testing.assert_array_equal(images, expected.images)

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    conditioning = pipe.encode_captions(PROMPTS[0], "a blurry photo", guided=True)
    latents, start = pipe.prepare_latents(1, 64, 64, seed=3, image=picture, strength=0.5, options=options)
    assert start == dataclasses.replace(options, first_step=1)  # 3 grid points, cut at int(3 * 0.5)
    images = pipe.decode(pipe.sample(latents, conditioning, start), output_type="latent")
    expected = pipe(
        PROMPTS[0], "a blurry photo", seed=3, image=picture, strength=0.5, output_type="latent", options=options
    )
    np.testing.assert_array_equal(images, expected.images)

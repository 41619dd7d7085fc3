"""Lumina-Image 2.0 end to end against diffusers' Lumina2Pipeline: tiny random components of the released
kinds (`reference.random_lumina2_pipeline`), saved with save_pretrained as a Lumina2Pipeline folder and loaded
by LuminaPipeline.from_pretrained."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from fake_hub import cache_repo
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from PIL import Image
from reference import random_lumina2_pipeline, randomize_lora_, relative_error
from test_img2img import photo

from lumina_jax import sampling
from lumina_jax.cli.convert import main as convert_main
from lumina_jax.cli.sample import main as sample_main
from lumina_jax.models.gemma import GemmaConfig
from lumina_jax.models.gemma2 import SYSTEM_PROMPTS, Gemma2Encoder
from lumina_jax.models.lumina2 import ORIGINAL_SAMPLING, UnifiedNextDiT
from lumina_jax.pipeline import LuminaPipeline, _noise, load_image

PROMPTS = ["A red fox in the snow", "an astronaut riding a horse on the moon, highly detailed, golden light"]
NEGATIVE = "blurry, low quality"
# longer than either prompt with its system prompt: diffusers' Lumina2Pipeline does not cut negatives to the prompts
LONG_NEGATIVE = " ".join(["ugly distorted blurry noisy dark washed out"] * 8)
CORPUS = PROMPTS + [NEGATIVE, LONG_NEGATIVE, SYSTEM_PROMPTS["real"] + " <Prompt Start>", SYSTEM_PROMPTS["align"]]
BOUND = 1e-5  # float32, relative, the whole sampler's latents


@pytest.fixture(scope="module")
def lumina2(tmp_path_factory):
    """The diffusers pipeline (in memory) and ours, loaded from the folder diffusers saved."""
    folder = tmp_path_factory.mktemp("lumina2")
    reference = random_lumina2_pipeline(folder, CORPUS)
    return folder, reference, LuminaPipeline.from_pretrained(folder, "float32", progress=False)


def test_the_folder_loads_as_lumina_image_2(lumina2):
    _, _, ours = lumina2
    assert isinstance(ours.transformer, UnifiedNextDiT) and isinstance(ours.text_encoder, Gemma2Encoder)
    assert ours.scheduler_shift == 3.0 and ours.default_sample_size == 128
    assert ours.sampler_defaults()["schedule"] == "lumina2"


CASES = {
    "normalized_cfg": dict(height=64, width=96, guidance_scale=4.0, negative_prompt=NEGATIVE, num_inference_steps=4),
    "truncated_cfg_without_normalization": dict(
        height=96,
        width=64,
        guidance_scale=5.0,
        negative_prompt=[LONG_NEGATIVE, NEGATIVE],
        num_inference_steps=5,
        cfg_trunc_ratio=0.5,
        cfg_normalization=False,
    ),
    "truncated_normalized_cfg": dict(
        height=64, width=96, guidance_scale=4.0, negative_prompt=NEGATIVE, num_inference_steps=4, cfg_trunc_ratio=0.7
    ),
    "no_guidance": dict(height=64, width=96, guidance_scale=1.0, num_inference_steps=3),
    "another_system_prompt": dict(
        height=64, width=96, guidance_scale=4.0, num_inference_steps=3, system_prompt=SYSTEM_PROMPTS["align"]
    ),
}


def reference_latents(reference, latents, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = reference(prompt=PROMPTS, latents=torch.from_numpy(latents), output_type="latent", **kwargs)
    return out.images.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_latents_match_diffusers(lumina2, case):
    _, reference, ours = lumina2
    kwargs = CASES[case]
    shape = (len(PROMPTS), 16, kwargs["height"] // 8, kwargs["width"] // 8)
    latents = np.random.default_rng(len(case)).standard_normal(shape, dtype=np.float32)
    expected = reference_latents(reference, latents, **kwargs)
    got = ours(prompt=PROMPTS, latents=latents, output_type="latent", **kwargs).images
    assert relative_error(got, expected) <= BOUND
    if case == "normalized_cfg":  # decoded through the FLUX VAE's scale and shift
        with torch.no_grad():
            images = reference(prompt=PROMPTS, latents=torch.from_numpy(latents), output_type="np", **kwargs).images
        got_images = ours(prompt=PROMPTS, latents=latents, output_type="np", **kwargs).images
        assert np.abs(got_images - images).max() <= 1e-4


def test_dynamic_shifting_as_diffusers_computes_it(lumina2, tmp_path):
    """use_dynamic_shifting: diffusers' mu from an "image_seq_len" of latents.shape[1], the channels."""
    folder, reference, _ = lumina2
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.6)
    shutil.copytree(folder, tmp_path / "dynamic")
    dynamic.save_pretrained(tmp_path / "dynamic" / "scheduler")
    ours = LuminaPipeline.from_pretrained(tmp_path / "dynamic", "float32", progress=False)
    kwargs = CASES["normalized_cfg"]
    latents = np.random.default_rng(5).standard_normal((2, 16, 8, 12), dtype=np.float32)
    default_scheduler, reference.scheduler = reference.scheduler, dynamic
    try:
        expected = reference_latents(reference, latents, **kwargs)
    finally:
        reference.scheduler = default_scheduler
    got = ours(prompt=PROMPTS, latents=latents, output_type="latent", **kwargs).images
    assert relative_error(got, expected) <= BOUND
    assert relative_error(got, reference_latents(reference, latents, **kwargs)) > 1e-3  # the shift mattered


def test_unsupported_scheduler_options_are_named(lumina2, tmp_path):
    folder, _, _ = lumina2
    shutil.copytree(folder, tmp_path / "karras")
    FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).save_pretrained(tmp_path / "karras" / "scheduler")
    with pytest.raises(ValueError, match=r"scheduler_config.json: use_karras_sigmas=True is not supported"):
        LuminaPipeline.from_pretrained(tmp_path / "karras", "float32", progress=False)


def test_cfg_trunc_ratio_and_system_prompt_are_checked(lumina2):
    _, _, ours = lumina2
    with pytest.raises(ValueError, match="cfg_trunc_ratio must be >= 0"):
        ours(prompt=PROMPTS[0], height=64, width=64, cfg_trunc_ratio=float("nan"))
    with pytest.raises(TypeError, match="system_prompt must be a string"):
        ours(prompt=PROMPTS[0], height=64, width=64, system_prompt=["real"])
    with pytest.raises(ValueError, match="system_prompt is Lumina-Image 2.0's .* Lumina-Next's captions have none"):
        GemmaConfig().prepare_captions(PROMPTS, "You are an assistant")


def test_the_released_pipeline_lowers_without_weights():
    """LuminaPipeline.abstract knows the released architecture by its hub id: every program of a 1024 px call
    (guided, truncated) lowers, the 2B transformer's parameters as shapes only."""
    pipe = LuminaPipeline.abstract("Alpha-VLLM/Lumina-Image-2.0")
    assert isinstance(pipe.transformer, UnifiedNextDiT) and pipe.transformer.config.hidden_size == 2304
    assert pipe.vae.config.latent_channels == 16 and pipe.default_sample_size == 1024
    programs = pipe.lower(height=1024, width=768, guidance_scale=4.0, cfg_trunc_ratio=0.5)
    assert sorted(programs) == ["decoder", "noise", "sampler", "text_encoder"]
    assert programs["sampler"][0].out_info.shape == (1, 16, 128, 96)


def test_sample_command_draws_lumina_image_2(lumina2, tmp_path, capsys):
    folder, _, ours = lumina2
    args = ["--model", str(folder), "--prompt", PROMPTS[1], "--height", "64", "--width", "96", "--steps", "3"]
    guidance = ["--cfg-trunc-ratio", "0.5", "--no-cfg-normalization"]
    assert sample_main([*args, *guidance, "--seed", "4", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    image = Image.open(tmp_path / "00000_4.png")
    assert image.size == (96, 64)
    settings = dict(num_inference_steps=3, seed=4, cfg_trunc_ratio=0.5, cfg_normalization=False)
    expected = ours(prompt=PROMPTS[1], height=64, width=96, output_type="np", **settings).images
    assert np.abs(np.asarray(image, np.float32) / 255 - expected[0]).max() <= 1 / 255
    record = json.loads((tmp_path / "index.jsonl").read_text())
    assert record["schedule"] == "lumina2" and record["cfg_all_channels"] is True
    assert record["cfg_trunc_ratio"] == 0.5 and record["cfg_normalization"] is False


def test_the_hub_id_samples_as_its_folder(lumina2, hub_cache, tmp_path, capsys):
    """The released repo's id (its files laid out in an offline hub cache) is what `python -m sample --model`
    and from_pretrained take, as the folder."""
    folder, _, ours = lumina2
    cache_repo(hub_cache, "Alpha-VLLM/Lumina-Image-2.0", folder)
    args = ["--model", "Alpha-VLLM/Lumina-Image-2.0", "--prompt", PROMPTS[0], "--height", "64", "--width", "64"]
    assert sample_main([*args, "--steps", "2", "--seed", "1", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    expected = ours(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=2, seed=1, output_type="np").images
    image = np.asarray(Image.open(tmp_path / "00000_1.png"), np.float32) / 255
    assert np.abs(image - expected[0]).max() <= 1 / 255


def test_sample_command_samples_as_the_original_repository(lumina2, tmp_path, capsys):
    """The original sampler by flags (models.lumina2.ORIGINAL_SAMPLING's, with 3 steps and a truncation here) and one
    of the original's system prompts by name draw what the pipeline draws with those keywords."""
    folder, _, ours = lumina2
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--height", "64", "--width", "64", "--steps", "3"]
    original = [
        "--schedule",
        "shifted",
        "--shift",
        "6",
        "--solver",
        "midpoint",
        "--renorm-cfg",
        "1",
        "--cfg-trunc",
        "0.5",
    ]
    command = [*args, *original, "--system-prompt", "align", "--dtype", "float32", "--out", str(tmp_path)]
    assert sample_main(command) == 0
    settings = ORIGINAL_SAMPLING | dict(num_inference_steps=3, cfg_trunc=0.5, system_prompt=SYSTEM_PROMPTS["align"])
    expected = ours(prompt=PROMPTS[0], height=64, width=64, output_type="np", **settings).images
    image = np.asarray(Image.open(tmp_path / "00000_0.png"), np.float32) / 255
    assert np.abs(image - expected[0]).max() <= 1 / 255
    record = json.loads((tmp_path / "index.jsonl").read_text())
    assert record["renorm_cfg"] == 1.0 and record["cfg_normalization"] is False and record["cfg_trunc"] == 0.5
    assert record["system_prompt"] == SYSTEM_PROMPTS["align"]
    # the default sampler draws another image: the flags took effect
    diffusers_default = ours(prompt=PROMPTS[0], height=64, width=64, output_type="np", num_inference_steps=3).images
    assert np.abs(diffusers_default[0] - expected[0]).max() > 0.05
    with pytest.raises(SystemExit):
        sample_main([*args, "--renorm-cfg", "1", "--cfg-normalization", "--out", str(tmp_path)])
    assert "choose one" in capsys.readouterr().err


def test_image_to_image_round_trips_through_the_flux_vae(lumina2):
    """Image-to-image for this family: strength 0 takes no step and returns the image's posterior sample decoded
    (the FLUX VAE's scale and shift undone in between, as diffusers' AutoencoderKL computes it); strength 1 is
    text-to-image."""
    _, reference, ours = lumina2
    image = photo(64, 64)
    got = ours(prompt=PROMPTS[0], image=image, strength=0.0, seed=3, num_inference_steps=4, output_type="np").images
    pixels = torch.from_numpy(load_image(image, 64, 64)[None])
    noise = torch.from_numpy(np.array(_noise(np.uint32(3), (1, 16, 8, 8), 1)))
    with torch.no_grad():
        posterior = reference.vae.encode(pixels).latent_dist
        expected = reference.vae.decode(posterior.mean + posterior.std * noise).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    assert np.abs(got - expected).max() <= 1 / 255
    kwargs = dict(prompt=PROMPTS[1], height=64, width=64, num_inference_steps=2, seed=5, output_type="latent")
    np.testing.assert_array_equal(ours(image=image, strength=1.0, **kwargs).images, ours(**kwargs).images)


def test_converted_pipeline_gives_the_same_latents(lumina2, tmp_path, capsys):
    """python -m convert on the diffusers folder: our format, the same family, the same latents to the bit."""
    folder, _, ours = lumina2
    assert convert_main([str(folder), str(tmp_path / "converted")]) == 0
    assert "Lumina-Image 2.0" in capsys.readouterr().out
    converted = LuminaPipeline.from_pretrained(tmp_path / "converted", "float32", progress=False)
    assert isinstance(converted.transformer, UnifiedNextDiT) and isinstance(converted.text_encoder, Gemma2Encoder)
    kwargs = dict(prompt=PROMPTS, height=64, width=96, num_inference_steps=3, negative_prompt=NEGATIVE)
    np.testing.assert_array_equal(
        converted(**kwargs, output_type="latent").images, ours(**kwargs, output_type="latent").images
    )


def _saved_lora(reference, folder, seed: int, targets: list[str]):
    """A random PEFT LoRA of the reference's transformer, saved as Lumina2Pipeline.save_lora_weights saves it."""
    config = LoraConfig(r=2 + seed % 3, lora_alpha=4 + seed, target_modules=targets)
    adapted = copy.deepcopy(reference.transformer)
    inject_adapter_in_model(config, adapted)
    randomize_lora_(adapted, seed=seed)
    reference.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(adapted),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_unmerged_adapters_change_strength_without_recompiling(lumina2, tmp_path):
    """Two LoRAs kept beside the weights (merge=False), on partly the same layers: at each pair of strengths
    set_adapters gives diffusers' latents with the same adapters and strengths, and what merging them gives,
    while the sampler compiled once."""
    folder, reference, _ = lumina2
    first = _saved_lora(reference, tmp_path / "a", 1, ["to_q", "to_v", "linear_3"])
    second = _saved_lora(reference, tmp_path / "b", 2, ["to_q", "to_out.0", "norm1.linear"])
    kwargs = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0)
    latents = np.random.default_rng(4).standard_normal((2, 16, 8, 8), dtype=np.float32)
    ours = LuminaPipeline.from_pretrained(folder, "float32", progress=False)
    ours.load_lora_weights(first, adapter_name="a", merge=False).load_lora_weights(second, merge=False)
    reference.load_lora_weights(first, adapter_name="a")
    reference.load_lora_weights(second, adapter_name="b")
    compiled = []
    try:
        for strengths in ([0.5, 0.3], [1.2, 0.0]):
            ours.set_adapters(["a", "pytorch_lora_weights"], strengths)
            before = sampling._integrate._cache_size()
            got = ours(prompt=PROMPTS, latents=latents, output_type="latent", **kwargs).images
            compiled.append(sampling._integrate._cache_size() - before)
            reference.set_adapters(["a", "b"], strengths)
            assert relative_error(got, reference_latents(reference, latents, **kwargs)) <= BOUND
            merged = LuminaPipeline.from_pretrained(folder, "float32", progress=False)
            merged.load_lora_weights(first, strengths[0]).load_lora_weights(second, strengths[1])
            expected = merged(prompt=PROMPTS, latents=latents, output_type="latent", **kwargs).images
            assert relative_error(got, expected) <= BOUND
    finally:
        reference.unload_lora_weights()
    assert compiled == [1, 0]  # the second strengths ran the program the first compiled
    with pytest.raises(ValueError, match=r"unknown \['c'\]"):
        ours.set_adapters(["c"], [1.0])


def test_a_lora_samples_as_diffusers_loads_it(lumina2, tmp_path, capsys):
    """A PEFT LoRA saved by Lumina2Pipeline.save_lora_weights: our pipeline with it merged at scale 0.5 gives
    the latents diffusers' pipeline gives with it loaded at 0.5; python -m sample --lora FILE:0.5 draws that image
    and records the adapter in the PNG (so --skip-existing redraws what another adapter drew)."""
    folder, reference, _ = lumina2
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "linear_1"])
    adapted = copy.deepcopy(reference.transformer)
    inject_adapter_in_model(config, adapted)
    randomize_lora_(adapted, seed=0)
    reference.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(adapted),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    kwargs = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0)
    latents = np.random.default_rng(3).standard_normal((2, 16, 8, 8), dtype=np.float32)
    ours = LuminaPipeline.from_pretrained(folder, "float32", progress=False).load_lora_weights(lora, 0.5)
    got = ours(prompt=PROMPTS, latents=latents, output_type="latent", **kwargs).images
    reference.load_lora_weights(lora, adapter_name="test")
    try:
        reference.set_adapters("test", 0.5)
        expected = reference_latents(reference, latents, **kwargs)
    finally:
        reference.unload_lora_weights()
    plain = LuminaPipeline.from_pretrained(folder, "float32", progress=False)
    assert (
        relative_error(plain(prompt=PROMPTS, latents=latents, output_type="latent", **kwargs).images, expected) > 1e-3
    )
    assert relative_error(got, expected) <= BOUND
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--height", "64", "--width", "64", "--steps", "3"]
    out = tmp_path / "out"
    assert sample_main([*args, "--lora", f"{lora}:0.5", "--seed", "2", "--dtype", "float32", "--out", str(out)]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    expected_image = ours(prompt=PROMPTS[0], seed=2, height=64, width=64, num_inference_steps=3, output_type="np")
    image = np.asarray(Image.open(out / "00000_2.png"), np.float32) / 255
    assert np.abs(image - expected_image.images[0]).max() <= 1 / 255
    assert json.loads((out / "index.jsonl").read_text())["lora"] == [f"{lora}:0.5"]

"""Lumina-T2I end to end: a pipeline folder of the released parts' layouts (the original code's Flag-DiT
checkpoint, a transformers LLaMA with its tokenizer, a diffusers VAE), sampled as the original demo samples.

The reference is the demo's own recipe composed from proven parts: captions tokenised as demo.py does
(tokenizer loaded with add_bos_token and add_eos_token, the empty caption for guidance, padded with 0 to
the longer of the two) and encoded by transformers' LlamaModel without a mask, then our Flag-DiT sampler
(`sampling.sample`, itself matched to the original forward_with_cfg and transport sampler in
test_flagdit_sampling.py) with the demo's settings: the 4-shifted uniform grid, guidance 4 on channels
0..2, NTK factor the token ratio at every step, proportional attention.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from reference import random_t2i_pipeline, relative_error
from transformers import AutoTokenizer

from lumina_jax.cli.convert import main as convert_main
from lumina_jax.cli.sample import main as sample_main
from lumina_jax.models.flagdit import FlagDiT
from lumina_jax.models.llama import LlamaEncoder
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.sampling import SamplerOptions, sample, shifted_schedule

PROMPTS = ["A red Cat sits on the mat", "a blue sky"]
CORPUS = PROMPTS + ["the quick brown fox jumps over the lazy dog", "a photo of a red cat"]
BOUND = 1e-5  # float32, relative; measured 0.8e-6 to 1.6e-6
DEMO = dict(guidance_scale=4.0, scaling_watershed=0.0, proportional_attn=True)


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lumina_t2i")
    text_encoder, _, _ = random_t2i_pipeline(folder, CORPUS)
    return folder, text_encoder, LuminaPipeline.from_pretrained(folder, "float32", progress=False)


def demo_caption_features(folder, text_encoder, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """demo.py's cap_feats and cap_mask: [caption, ""], right-padded with 0, LlamaModel without a mask."""
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", add_bos_token=True, add_eos_token=True)
    tokens = [tokenizer.encode(caption, truncation=False), tokenizer.encode("", truncation=False)]
    ids = torch.zeros([2, max(map(len, tokens))], dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, row_tokens in enumerate(tokens):
        ids[row, : len(row_tokens)] = torch.tensor(row_tokens)
        mask[row, : len(row_tokens)] = True
    with torch.no_grad():
        features = text_encoder(input_ids=ids).last_hidden_state
    return features.numpy(), mask.numpy().astype(np.int32)


def demo_latents(pipe, folder, text_encoder, caption, noise, steps, shift=4.0, solver="euler"):
    features, mask = demo_caption_features(folder, text_encoder, caption)
    schedule = shifted_schedule(steps, shift=shift)
    return np.asarray(sample(pipe.transformer, noise, features, mask, schedule, SamplerOptions(solver=solver, **DEMO)))


def test_the_folder_loads_as_lumina_t2i(t2i):
    _, _, pipe = t2i
    assert isinstance(pipe.transformer, FlagDiT) and isinstance(pipe.text_encoder, LlamaEncoder)
    assert pipe.sampler_defaults() == dict(schedule="shifted", scaling_watershed=0.0)
    assert pipe.scheduler_shift == 4.0 and pipe.default_sample_size == 256
    ids = pipe.tokenizer("A red Cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.pad_token_id == 0  # LLaMA's <unk>: the original pads with 0


@pytest.mark.parametrize(
    "size, steps, solver",
    [((64, 96), 4, "euler"), ((96, 64), 3, "midpoint"), ((320, 320), 2, "euler")],  # the last extrapolates
    ids=["wide", "tall_midpoint", "extrapolated"],
)
def test_latents_match_the_demo_recipe(t2i, size, steps, solver):
    folder, text_encoder, pipe = t2i
    height, width = size
    noise = np.random.default_rng(height + width).standard_normal((2, 4, height // 8, width // 8), dtype=np.float32)
    got = pipe(
        prompt=PROMPTS,
        latents=noise,
        height=height,
        width=width,
        num_inference_steps=steps,
        solver=solver,
        output_type="latent",
    ).images
    for row, prompt in enumerate(PROMPTS):
        expected = demo_latents(pipe, folder, text_encoder, prompt, noise[row : row + 1], steps, solver=solver)
        assert relative_error(got[row : row + 1], expected) <= BOUND


def test_captions_are_encoded_as_typed(t2i):
    _, _, pipe = t2i
    run = lambda prompt: pipe(prompt=prompt, height=64, width=64, num_inference_steps=2, output_type="latent").images  # noqa: E731
    assert not np.allclose(run("A red Cat"), run("a red cat"))  # Lumina-Next's pipeline lower-cases; T2I's does not


def test_shift_and_settings_override_the_defaults(t2i):
    folder, text_encoder, pipe = t2i
    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    got = pipe(prompt=PROMPTS[0], latents=noise, height=64, width=64, num_inference_steps=3, shift=6.0)
    latents = pipe(
        prompt=PROMPTS[0], latents=noise, height=64, width=64, num_inference_steps=3, shift=6.0, output_type="latent"
    ).images
    expected = demo_latents(pipe, folder, text_encoder, PROMPTS[0], noise, 3, shift=6.0)
    assert relative_error(latents, expected) <= BOUND
    assert got.images[0].size == (64, 64)


def test_without_a_scheduler_config_the_demo_shift_is_used(t2i, tmp_path):
    folder, _, pipe = t2i
    shutil.copytree(folder, tmp_path / "no_scheduler", ignore=shutil.ignore_patterns("scheduler"))
    bare = LuminaPipeline.from_pretrained(tmp_path / "no_scheduler", "float32", progress=False)
    assert bare.scheduler_shift is None
    kwargs = dict(prompt=PROMPTS[1], height=64, width=64, num_inference_steps=3, seed=7, output_type="latent")
    np.testing.assert_array_equal(bare(**kwargs).images, pipe(**kwargs).images)


def test_converted_pipeline_gives_the_same_latents(t2i, tmp_path):
    folder, _, pipe = t2i
    assert convert_main([str(folder), str(tmp_path / "converted")]) == 0
    converted = LuminaPipeline.from_pretrained(tmp_path / "converted", "float32", progress=False)
    assert isinstance(converted.transformer, FlagDiT) and isinstance(converted.text_encoder, LlamaEncoder)
    kwargs = dict(prompt=PROMPTS, height=64, width=96, num_inference_steps=2, seed=[1, 2], output_type="latent")
    np.testing.assert_array_equal(converted(**kwargs).images, pipe(**kwargs).images)


def test_a_pipeline_assembled_from_the_released_parts_gives_the_same_latents(t2i, tmp_path, capsys):
    folder, _, pipe = t2i
    llama = tmp_path / "llama"  # as meta-llama/Llama-2-7b-hf: the model with its tokenizer beside it
    shutil.copytree(folder / "text_encoder", llama)
    for file in (folder / "tokenizer").iterdir():
        shutil.copy(file, llama / file.name)
    parts = [str(folder / "transformer"), str(tmp_path / "out"), "--text-encoder", str(llama), "--vae"]
    assert convert_main([*parts, str(folder / "vae"), "--shift", "4"]) == 0
    assert "Flag-DiT (Lumina-T2I)" in capsys.readouterr().out
    assembled = LuminaPipeline.from_pretrained(tmp_path / "out", "float32", progress=False)
    assert assembled.scheduler_shift == 4.0
    kwargs = dict(prompt=PROMPTS, height=64, width=64, num_inference_steps=2, seed=3, output_type="latent")
    np.testing.assert_array_equal(assembled(**kwargs).images, pipe(**kwargs).images)
    with pytest.raises(SystemExit, match="2"):
        convert_main([*parts[:-1], "--transformer-only"])
    assert "both --text-encoder and --vae" in capsys.readouterr().err


def test_sample_command_draws_lumina_t2i(t2i, tmp_path, capsys):
    folder, _, pipe = t2i
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--height", "64", "--width", "96", "--steps", "3"]
    assert sample_main([*args, "--seed", "4", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    image = Image.open(tmp_path / "00000_4.png")
    expected = pipe(prompt=PROMPTS[0], height=64, width=96, num_inference_steps=3, seed=4, output_type="np").images
    assert np.abs(np.asarray(image, np.float32) / 255 - expected[0]).max() <= 1 / 255
    record = json.loads((tmp_path / "index.jsonl").read_text())
    assert record["schedule"] == "shifted" and record["scaling_watershed"] == 0.0


def test_sizes_beyond_the_rope_table_are_refused(t2i):
    _, _, pipe = t2i
    pipe.check_size(16 * 150, 16 * 265)  # 150 rows of 265 tokens and an end-of-line token: 39,900 positions
    with pytest.raises(ValueError, match=r"multiples of 16 from 16 px, with \(height / 16\) x \(width / 16 \+ 1\)"):
        pipe.check_size(16 * 150, 16 * 266)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.check_size(72, 64)

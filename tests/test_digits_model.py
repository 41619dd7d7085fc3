"""The shipped digits model (lumina_jax/assets/lumina-next-digits): `python -m sample` draws with it by default,
and it draws digits.

Its quality is measured by `python -m train eval` (200 samples, a classifier), not here; this checks that the
folder is whole, loads through the same pipeline as Lumina-Next-SFT and samples a digit-like image.
"""

import json

import numpy as np
from PIL import Image

from lumina_jax.assets import DIGITS_MODEL
from lumina_jax.cli.sample import main as sample_main
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.training.digits import evaluate


def test_the_shipped_model_is_a_pixel_space_pipeline_folder():
    index = json.loads((DIGITS_MODEL / "model_index.json").read_text())
    assert index["vae"] == [None, None]
    for component in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        assert (DIGITS_MODEL / component).is_dir(), component
    size = sum(f.stat().st_size for f in DIGITS_MODEL.rglob("*") if f.is_file())
    assert size < 10e6  # a few MB, as committed


def test_sample_without_model_draws_a_digit(tmp_path, capsys):
    assert sample_main(["--prompt", "a handwritten digit three", "--steps", "20", "--out", str(tmp_path)]) == 0
    image = Image.open(tmp_path / "00000_0.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert image.text["model"] == str(DIGITS_MODEL)
    pixels = np.asarray(image)
    assert (pixels < 96).mean() > 0.05 and (pixels > 192).mean() > 0.3  # dark ink on light paper
    assert "wrote 1 image(s)" in capsys.readouterr().out


def test_each_prompted_digit_is_read_back_by_the_classifier_mostly():
    pipe = LuminaPipeline.from_pretrained(DIGITS_MODEL, dtype="float32", progress=False)
    prompts = [f"the number {digit}, written by hand" for digit in range(10)]
    images = pipe(prompt=prompts, num_inference_steps=20, guidance_scale=4.0, seed=0, output_type="np").images
    # one image per digit: a broken model (noise, blank, one digit for all) scores about 0.1
    assert evaluate(images, list(range(10)))["accuracy"] >= 0.7


def test_context_drop_reaches_the_model_through_the_pipeline():
    pipe = LuminaPipeline.from_pretrained(DIGITS_MODEL, dtype="float32", progress=False)
    options = dict(prompt="a handwritten digit five", num_inference_steps=4, seed=3, output_type="np")
    exact, merged = pipe(**options).images, pipe(**options, context_drop=2).images
    assert exact.shape == merged.shape and np.isfinite(merged).all()
    # it took effect (how far it moves the output is measured in tests/test_context_drop.py; on this
    # 4x4-token model a 2x2 window leaves 4 keys, far coarser than at 2048 px)
    assert np.abs(exact - merged).max() > 0.01

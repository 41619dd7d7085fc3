"""The tiny pipeline that the TPU-compiler tests plan: config files only, as `--compile-only` takes them."""

import json
from pathlib import Path

import jax

from lumina_jax import tpu
from lumina_jax.sharding import make_mesh

TINY_TRANSFORMER = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    hidden_size=144,
    num_layers=2,
    num_attention_heads=4,
    num_kv_heads=2,
    multiple_of=32,
    cross_attention_dim=64,
)
TINY_GEMMA = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)
TINY_VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)


def one_chip(name: str = "v5e-4") -> jax.sharding.Mesh:
    return make_mesh(fsdp=1, devices=tpu.compile_devices(tpu.tpu_slice(name)))


def write_config_folder(folder: Path) -> Path:
    """A pipeline folder of config files only: the tiny Next-DiT, Gemma and VAE above."""
    index = {
        "_class_name": "LuminaPipeline",
        "transformer": ["diffusers", "LuminaNextDiT2DModel"],
        "text_encoder": ["transformers", "GemmaModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, config in (("transformer", TINY_TRANSFORMER), ("text_encoder", TINY_GEMMA), ("vae", TINY_VAE)):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder

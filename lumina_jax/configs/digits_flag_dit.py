"""The digits demo with Lumina-T2I's transformer: a small pixel-space Flag-DiT on scikit-learn's handwritten digits.

The same data, base pipeline (a tiny random-weight Gemma text encoder) and recipe as digits.py, with a
Flag-DiT in place of the Next-DiT: rows of 8x8 patches each closed by the end-of-line token, 1D RoPE.
Produces out/digits_flag_dit/pipeline/ (the transformer in lumina-jax's format: Flag-DiT has no diffusers
layout), which samples as Lumina-T2I's demo does. Needs scikit-learn: pip install -e ".[digits]".
"""

import dataclasses

from lumina_jax.configs import digits
from lumina_jax.models.flagdit import FlagDiTConfig
from lumina_jax.training.config import TrainConfig

SIZES = ("sample_size", "patch_size", "in_channels", "hidden_size", "num_layers", "num_attention_heads")
SIZES += ("num_kv_heads", "multiple_of", "learn_sigma", "cross_attention_dim")


def get_config() -> TrainConfig:
    config = digits.get_config()
    return dataclasses.replace(
        config,
        workdir="out/digits_flag_dit",
        pipeline="out/digits_flag_dit/base",
        data="out/digits_flag_dit/data/captions.jsonl",
        cache="out/digits_flag_dit/cache",
        # digits.py's sizes: 32x32 grey pixels in 8x8 patches, 128 wide, 4 layers, Gemma features of 64
        transformer=FlagDiTConfig(**{name: getattr(config.transformer, name) for name in SIZES}),
    )

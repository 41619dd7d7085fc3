"""lumina-jax: Lumina-Next (and Lumina-T2I's Flag-DiT) text-to-image in JAX and Flax NNX."""

from lumina_jax import tpu
from lumina_jax.models.flagdit import FlagDiT, FlagDiTConfig
from lumina_jax.models.nextdit import PRESETS, NextDiT, NextDiTConfig
from lumina_jax.pipeline import LuminaPipeline, LuminaPipelineOutput
from lumina_jax.weights.nextdit import load_transformer
from lumina_jax.weights.text_encoder import load_text_encoder
from lumina_jax.weights.vae import load_vae

tpu.describe_single_host()  # before any device query: an installed libtpu stays quiet off a TPU VM

__all__ = [
    "PRESETS",
    "FlagDiT",
    "FlagDiTConfig",
    "LuminaPipeline",
    "LuminaPipelineOutput",
    "NextDiT",
    "NextDiTConfig",
    "load_text_encoder",
    "load_transformer",
    "load_vae",
]

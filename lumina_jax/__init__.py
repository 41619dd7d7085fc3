"""lumina-jax: Lumina-Next text-to-image in JAX and Flax NNX."""

from lumina_jax.models.nextdit import PRESETS, NextDiT, NextDiTConfig
from lumina_jax.weights.nextdit import load_transformer

__all__ = ["PRESETS", "NextDiT", "NextDiTConfig", "load_transformer"]

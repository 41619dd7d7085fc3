"""Which text encoder a folder holds: Lumina-Next's Gemma, Lumina-Image 2.0's Gemma-2 or Lumina-T2I's LLaMA, by
its config's model_type."""

from pathlib import Path

from flax import nnx

from lumina_jax import hub
from lumina_jax.weights.family import ModelFamily, registered_family, registered_model
from lumina_jax.weights.gemma import GEMMA
from lumina_jax.weights.gemma2 import GEMMA2
from lumina_jax.weights.llama import LLAMA

TEXT_ENCODERS: dict[str, ModelFamily] = {"gemma": GEMMA, "gemma2": GEMMA2, "llama": LLAMA}


def text_encoder_family(folder: Path) -> ModelFamily:
    """The family of the text encoder in `folder` (a model folder, or a pipeline's text_encoder/): its
    config.json's model_type; Gemma where there is none."""
    return registered_family(folder, TEXT_ENCODERS, "model_type", "gemma", "text encoder")


def text_encoder_model(config) -> type:
    """The model class of a text encoder's config (a `GemmaConfig` builds a `GemmaEncoder`)."""
    return registered_model(config, TEXT_ENCODERS, "text encoder")


def load_text_encoder(
    path: str | Path, dtype: str = "float32", *, revision: str | None = None, **options
) -> nnx.Module:
    """The text encoder at `path` (a model folder, a pipeline's, a converted folder, or a hub id's files at
    `revision`), of the family its config.json names; `options` as `ModelFamily.build` takes them."""
    path = hub.local_path(path, "text_encoder", revision=revision)
    folder = path / "text_encoder" if (path / "model_index.json").exists() else path
    return text_encoder_family(folder).load(path, dtype, **options)

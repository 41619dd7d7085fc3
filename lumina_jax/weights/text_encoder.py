"""Which text encoder a folder holds: Lumina-Next's Gemma, Lumina-Image 2.0's Gemma-2 or Lumina-T2I's LLaMA, by
its config's model_type."""

import json
from pathlib import Path

from flax import nnx

from lumina_jax import hub
from lumina_jax.weights.family import ModelFamily
from lumina_jax.weights.gemma import GEMMA
from lumina_jax.weights.gemma2 import GEMMA2
from lumina_jax.weights.llama import LLAMA

TEXT_ENCODERS: dict[str, ModelFamily] = {"gemma": GEMMA, "gemma2": GEMMA2, "llama": LLAMA}


def text_encoder_family(folder: Path) -> ModelFamily:
    """The family of the text encoder in `folder` (a model folder, or a pipeline's text_encoder/): its
    config.json's model_type; Gemma where there is none."""
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type", "gemma") if config.is_file() else "gemma"
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not a supported text encoder config: {e}") from None
    if model_type not in TEXT_ENCODERS:
        raise ValueError(
            f"{config}: text encoder model_type {model_type!r} is not supported; lumina-jax runs "
            f"{', '.join(repr(t) for t in TEXT_ENCODERS)} (Lumina-Next's Gemma, Lumina-Image 2.0's Gemma-2, "
            "Lumina-T2I's LLaMA)"
        )
    return TEXT_ENCODERS[model_type]


def text_encoder_model(config) -> type:
    """The model class of a text encoder's config (a `GemmaConfig` builds a `GemmaEncoder`)."""
    models = {family.config: family.model for family in TEXT_ENCODERS.values()}
    if type(config) not in models:
        raise ValueError(
            f"{type(config).__name__} is no text encoder's config; lumina-jax runs {', '.join(TEXT_ENCODERS)}"
        )
    return models[type(config)]


def load_text_encoder(
    path: str | Path, dtype: str = "float32", *, revision: str | None = None, **options
) -> nnx.Module:
    """The text encoder at `path` (a model folder, a pipeline's, a converted folder, or a hub id's files at
    `revision`), of the family its config.json names; `options` as `ModelFamily.build` takes them."""
    path = hub.local_path(path, "text_encoder", revision=revision)
    folder = path / "text_encoder" if (path / "model_index.json").exists() else path
    return text_encoder_family(folder).load(path, dtype, **options)

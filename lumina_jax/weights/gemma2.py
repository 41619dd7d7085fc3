"""Finding, checking and importing Lumina-Image 2.0's Gemma-2 text encoder's weights.

Layouts as Gemma's: a transformers folder (config.json with model.safetensors, or shards listed by
model.safetensors.index.json), a diffusers pipeline folder (its text_encoder/), or a folder written by
`convert_gemma2`. Keys are Gemma2Model's, or Gemma2ForCausalLM's under `model.` (google/gemma-2-2b, which
the original loads, ties its LM head to the embedding and stores none); any other key is refused.
"""

import functools

import numpy as np

from lumina_jax.models.gemma2 import Gemma2Config, Gemma2Encoder
from lumina_jax.weights.family import ModelFamily
from lumina_jax.weights.gemma import LAYER_NORMS, decoder_key_to_target, gemma_keys

GEMMA2_LAYER_NORMS = (*LAYER_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")

gemma2_key_to_target = functools.partial(decoder_key_to_target, norm_scale="weight", layer_norms=GEMMA2_LAYER_NORMS)

GEMMA2 = ModelFamily(
    name="Gemma-2",
    model=Gemma2Encoder,
    config=Gemma2Config,
    key_to_target=gemma2_key_to_target,
    subfolder="text_encoder",
    stem="model",
    hub_kind="text_encoder",
)
load_gemma2 = GEMMA2.load  # (path, dtype, *, param_dtype=, scan_layers=, mesh=, revision=)
convert_gemma2 = GEMMA2.convert


def transformers_state_dict(encoder: Gemma2Encoder) -> dict[str, np.ndarray]:
    """Every parameter, the unused last layer and final norm included, under Gemma2Model's names and layouts."""
    return GEMMA2.export_state_dict(encoder, gemma_keys(encoder.config, GEMMA2_LAYER_NORMS))

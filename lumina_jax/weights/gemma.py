"""Finding, checking and importing the Gemma text encoder's weights.

Layouts: a transformers folder (config.json with model.safetensors, or shards listed by
model.safetensors.index.json), a diffusers pipeline folder (its text_encoder/), or a folder written by
`convert_text_encoder`. Keys are GemmaModel's, or GemmaForCausalLM's under `model.`; the released
Lumina-Next text encoders carry no `lm_head.weight` (the causal LM ties it to the embedding), so it
is refused like any other unknown key.
"""

import functools
import re

import numpy as np

from lumina_jax.models.gemma import GemmaConfig, GemmaEncoder
from lumina_jax.weights.family import ModelFamily
from lumina_jax.weights.importer import LINEAR, Target, UnknownKeyError

_CAUSAL_LM_PREFIX = "model."
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj\.(?:weight|bias)|mlp\.(?:gate|up|down)_proj\.weight)")
_LINEAR_LEAF = {"weight": ("kernel", LINEAR), "bias": ("bias", None)}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def decoder_key_to_target(key: str, *, norm_scale: str, layer_norms: tuple[str, ...] = LAYER_NORMS) -> Target:
    """Map a transformers decoder's key (GemmaModel's, LlamaModel's, or the causal LM's `model.`-prefixed)
    to our parameter; `norm_scale` names our RMSNorms' weight ("weight" for Gemma's, "scale" for LLaMA's),
    `layer_norms` the norms of a layer."""
    key = key.removeprefix(_CAUSAL_LM_PREFIX)
    if key == "embed_tokens.weight":
        return Target(("embed_tokens", "embedding"))
    if key == "norm.weight":
        return Target(("norm", norm_scale))
    if match := _LAYER_KEY.fullmatch(key):
        *module, leaf = match[2].split(".")
        name, permute = _LINEAR_LEAF[leaf]
        return Target(("layers", *module, name), int(match[1]), permute)
    if match := re.fullmatch(rf"layers\.(\d+)\.({'|'.join(layer_norms)})\.weight", key):
        return Target(("layers", match[2], norm_scale), int(match[1]))
    raise UnknownKeyError(key)


gemma_key_to_target = functools.partial(decoder_key_to_target, norm_scale="weight")


def gemma_keys(config: GemmaConfig, layer_norms: tuple[str, ...] = LAYER_NORMS) -> list[str]:
    """Every key of a transformers GemmaModel (or a decoder with these `layer_norms`) with this config,
    for writing that layout back out."""
    projections = [f"self_attn.{p}_proj" for p in "qkvo"]
    leaves = ["weight", "bias"] if config.attention_bias else ["weight"]
    per_layer = [f"{p}.{leaf}" for p in projections for leaf in leaves]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += [f"{norm}.weight" for norm in layer_norms]
    layers = [f"layers.{i}.{key}" for i in range(config.num_hidden_layers) for key in per_layer]
    return ["embed_tokens.weight", *layers, "norm.weight"]


GEMMA = ModelFamily(
    name="Gemma",
    model=GemmaEncoder,
    config=GemmaConfig,
    key_to_target=gemma_key_to_target,
    subfolder="text_encoder",
    stem="model",
    hub_kind="text_encoder",
)
find_text_encoder = GEMMA.find
parameter_shapes = GEMMA.parameter_shapes
load_gemma = GEMMA.load  # (path, dtype, *, param_dtype=, scan_layers=, mesh=, revision=)
convert_text_encoder = GEMMA.convert


def transformers_state_dict(encoder: GemmaEncoder) -> dict[str, np.ndarray]:
    """Every parameter, the unused last layer and final norm included, under GemmaModel's names and layouts."""
    return GEMMA.export_state_dict(encoder, gemma_keys(encoder.config))

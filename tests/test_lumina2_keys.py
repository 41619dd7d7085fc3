"""The Lumina-Image 2.0 key map against the released model's config and diffusers' own key and shape list."""

from pathlib import Path

import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from reference import ShapeOnly

from lumina_jax.models.lumina2 import PRESETS, UnifiedNextDiTConfig
from lumina_jax.weights.importer import UnknownKeyError
from lumina_jax.weights.lumina2_keys import diffusers_key_to_target, diffusers_keys
from lumina_jax.weights.nextdit import TransformerCheckpoint, config_from_dict, parameter_shapes, plan_import

# Alpha-VLLM/Lumina-Image-2.0, transformer/config.json, as published
RELEASED_CONFIG = {
    "_class_name": "Lumina2Transformer2DModel",
    "_diffusers_version": "0.32.2",
    "axes_dim_rope": [32, 32, 32],
    "axes_lens": [300, 512, 512],
    "cap_feat_dim": 2304,
    "ffn_dim_multiplier": None,
    "hidden_size": 2304,
    "in_channels": 16,
    "multiple_of": 256,
    "norm_eps": 1e-05,
    "num_attention_heads": 24,
    "num_kv_heads": 8,
    "num_layers": 26,
    "num_refiner_layers": 2,
    "out_channels": None,
    "patch_size": 2,
    "sample_size": 128,
    "scaling_factor": 1.0,
}


def test_the_released_config_is_the_preset():
    config = config_from_dict(RELEASED_CONFIG)
    assert config == PRESETS["NextDiT_2B_GQA_patch2_Adaln_Refiner"]
    assert (config.head_dim, config.kv_heads, config.ffn_dim, config.cond_dim, config.out_channels) == (
        96,
        8,
        9216,
        1024,
        16,
    )


def test_diffusers_released_keys_and_shapes_cover_every_parameter():
    """diffusers' model of the released config (built without memory) names every parameter of ours once,
    with its shape: the plan checks names and shapes, and no parameter is left out."""
    values = {k: v for k, v in RELEASED_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = Lumina2Transformer2DModel(**values)
    tensors = {key: ShapeOnly(tensor.shape) for key, tensor in reference.state_dict().items()}
    config = UnifiedNextDiTConfig.from_dict(RELEASED_CONFIG)
    plan = plan_import(TransformerCheckpoint(Path("Lumina-Image-2.0/transformer"), config, tensors, "diffusers"))
    assert len(plan) == len(tensors)
    assert set(tensors) == set(diffusers_keys(config.num_layers, config.num_refiner_layers))
    ours = sum(int(torch.tensor(shape).prod()) for shape in parameter_shapes(config).values())
    assert ours == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(
    "key",
    [
        "context_refiner.0.norm1.linear.weight",  # the context refiner has no adaLN
        "noise_refiner.0.norm1.weight",  # the noise refiner's norm1 is a LuminaRMSNormZero
        "layers.0.attn.to_q.bias",
        "layers.0.attn.qkv.weight",  # the original layout's name
        "pad_token",
        "time_caption_embed.caption_embedder.0.bias",
    ],
)
def test_unknown_keys_raise(key):
    with pytest.raises(UnknownKeyError):
        diffusers_key_to_target(key)

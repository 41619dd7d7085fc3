"""The Lumina-Image 2.0 key map against the released model's config and diffusers' own key and shape list."""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from reference import ShapeOnly, relative_error

from lumina_jax.models.lumina2 import ORIGINAL_QK_NORM_EPS, PRESETS, UnifiedNextDiTConfig
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


def original_state_dict(config: UnifiedNextDiTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the original code's names (Alpha-VLLM's Lumina-Image-2.0 models/model.py `NextDiT`,
    its unused norm_final included), written from its module definitions."""
    d, cond, ffn, features = config.hidden_size, config.cond_dim, config.ffn_dim, config.patch_size**2 * 16
    qkv = (config.num_attention_heads + 2 * config.kv_heads) * config.head_dim
    shapes = {
        "x_embedder.weight": (d, features),
        "x_embedder.bias": (d,),
        "t_embedder.mlp.0.weight": (cond, 256),
        "t_embedder.mlp.0.bias": (cond,),
        "t_embedder.mlp.2.weight": (cond, cond),
        "t_embedder.mlp.2.bias": (cond,),
        "cap_embedder.0.weight": (config.cap_feat_dim,),
        "cap_embedder.1.weight": (d, config.cap_feat_dim),
        "cap_embedder.1.bias": (d,),
        "norm_final.weight": (d,),
        "final_layer.linear.weight": (features, d),
        "final_layer.linear.bias": (features,),
        "final_layer.adaLN_modulation.1.weight": (d, cond),
        "final_layer.adaLN_modulation.1.bias": (d,),
    }
    block = {
        "attention.qkv.weight": (qkv, d),
        "attention.out.weight": (d, d),
        "attention.q_norm.weight": (config.head_dim,),
        "attention.k_norm.weight": (config.head_dim,),
        "feed_forward.w1.weight": (ffn, d),
        "feed_forward.w2.weight": (d, ffn),
        "feed_forward.w3.weight": (ffn, d),
        "attention_norm1.weight": (d,),
        "attention_norm2.weight": (d,),
        "ffn_norm1.weight": (d,),
        "ffn_norm2.weight": (d,),
    }
    modulation = {"adaLN_modulation.1.weight": (4 * d, cond), "adaLN_modulation.1.bias": (4 * d,)}
    for stack, depth in (("context_refiner", config.num_refiner_layers), ("noise_refiner", config.num_refiner_layers)):
        for i in range(depth):
            table = block if stack == "context_refiner" else block | modulation
            shapes |= {f"{stack}.{i}.{name}": shape for name, shape in table.items()}
    shapes |= {
        f"layers.{i}.{name}": shape for i in range(config.num_layers) for name, shape in (block | modulation).items()
    }
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        state[key] = (
            noise * shape[1] ** -0.5 if len(shape) == 2 else (1 + 0.2 * noise if "norm" in key else 0.3 * noise)
        )
    return state


# The original code's; ComfyUI's single file; its all-in-one file, the VAE and Gemma-2 beside the transformer
# (under their own prefixes: what they hold is not read).
AROUND_THE_TRANSFORMER = {
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "text_encoders.gemma2_2b.transformer.model.embed_tokens.weight": (7, 24),
}


@pytest.mark.parametrize(
    "prefix, beside",
    [("", {}), ("model.diffusion_model.", {}), ("model.diffusion_model.", AROUND_THE_TRANSFORMER)],
    ids=["original", "comfyui", "comfyui-all-in-one"],
)
def test_original_checkpoint_matches_diffusers_converting_it(tmp_path, prefix, beside):
    """diffusers' own single-file converter (which splits qkv at the released widths, so the test has them)
    turns the original weights into its model; ours reads the file itself and computes the same."""
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers
    from safetensors.torch import save_file

    from lumina_jax import load_transformer

    config = UnifiedNextDiTConfig(num_layers=1, num_refiner_layers=1, ffn_dim_multiplier=0.1, cap_feat_dim=24)
    state = original_state_dict(config, seed=5)
    reference = Lumina2Transformer2DModel(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})
    reference.load_state_dict(convert_lumina2_to_diffusers(dict(state)), strict=True)
    path = tmp_path / "consolidated.00-of-01.safetensors"
    beside = {key: torch.ones(shape) for key, shape in beside.items()}
    save_file({prefix + key: tensor.contiguous() for key, tensor in state.items()} | beside, path)
    model = load_transformer(path, progress=False)
    ffn = dict(multiple_of=config.multiple_of, ffn_dim_multiplier=config.ffn_dim_multiplier)  # read as equivalents
    assert model.config.ffn_dim == config.ffn_dim and dataclasses.replace(model.config, **ffn) == dataclasses.replace(
        config, qk_norm_eps=ORIGINAL_QK_NORM_EPS
    )
    for name, module in reference.named_modules():  # the original code's query/key norms, as ours reads them
        if name.endswith(("norm_q", "norm_k")):
            module.eps = ORIGINAL_QK_NORM_EPS

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 4, 6), dtype=np.float32)
    t = np.asarray([0.3, 0.8], np.float32)
    caption = rng.standard_normal((2, 5, 24), dtype=np.float32)
    mask = np.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.no_grad():
        expected = reference.eval()(*(torch.from_numpy(a) for a in (x, t, caption, mask)), return_dict=False)[0]
    ours = model(*(jnp.asarray(a) for a in (x, t, caption, mask)))
    assert relative_error(ours, expected.numpy()) <= 1e-5

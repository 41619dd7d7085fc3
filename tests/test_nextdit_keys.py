"""The pure key maps, checked against the key and shape lists of the released 2B checkpoints."""

from pathlib import Path

import pytest
from reference import ShapeOnly, released

from lumina_jax import PRESETS
from lumina_jax.weights.importer import LINEAR, Target, UnknownKeyError
from lumina_jax.weights.nextdit import TransformerCheckpoint, config_from_original, plan_import
from lumina_jax.weights.nextdit_keys import (
    diffusers_key_to_target,
    diffusers_keys,
    original_key_to_diffusers,
)

RELEASED = PRESETS["NextDiT_2B_GQA_patch2"]


def test_examples():
    assert diffusers_key_to_target("layers.3.attn1.to_q.weight") == Target(
        ("layers", "attention", "to_q", "kernel"), 3, LINEAR
    )
    assert diffusers_key_to_target("layers.3.attn2.to_q.weight") == Target(
        ("layers", "attention", "to_q", "kernel"), 3, LINEAR
    )
    assert diffusers_key_to_target("layers.0.attn2.to_k.weight").path == (
        "layers",
        "attention",
        "to_k_caption",
        "kernel",
    )
    assert diffusers_key_to_target("layers.5.gate") == Target(("layers", "attention", "gate"), 5)
    assert diffusers_key_to_target("norm_out.linear_2.bias") == Target(("final_linear", "bias"))
    assert diffusers_key_to_target("layers.1.norm1.norm.weight") == Target(("layers", "attention_norm1", "scale"), 1)
    assert original_key_to_diffusers("layers.7.attention.wk_y.weight") == "layers.7.attn2.to_k.weight"
    assert original_key_to_diffusers("layers.7.attention.gate") == "layers.7.gate"
    assert original_key_to_diffusers("t_embedder.mlp.2.bias") == "time_caption_embed.timestep_embedder.linear_2.bias"
    assert original_key_to_diffusers("final_layer.adaLN_modulation.1.weight") == "norm_out.linear_1.weight"


@pytest.mark.parametrize(
    "key", ["layers.0.attn3.to_q.weight", "transformer.pad_token", "layers.x.gate", "norm_out.weight"]
)
def test_unknown_keys_raise(key):
    with pytest.raises(UnknownKeyError):
        diffusers_key_to_target(key)
    with pytest.raises(UnknownKeyError):
        original_key_to_diffusers(key)


def test_released_diffusers_keys_cover_every_parameter():
    checkpoint = TransformerCheckpoint(
        Path("Lumina-Next-SFT-diffusers"), RELEASED, released("keys_diffusers_transformer_2b.json"), "diffusers"
    )
    plan = plan_import(checkpoint)
    assert len(plan) == 639
    assert {key for key, _, _ in plan} <= set(diffusers_keys(RELEASED.num_layers))


def test_released_original_keys_cover_every_parameter_and_name_the_diffusers_keys():
    original = released("keys_original_next_dit_2b.json")
    checkpoint = TransformerCheckpoint(Path("consolidated.00-of-01.safetensors"), RELEASED, original, "original")
    assert len(plan_import(checkpoint)) == len(original)
    diffusers = released("keys_diffusers_transformer_2b.json")
    renamed = {original_key_to_diffusers(k): v.shape for k, v in original.items()}
    assert renamed.items() <= {k: v.shape for k, v in diffusers.items()}.items()
    # diffusers adds only the second copy of the shared query and its norm
    assert sorted({k.split(".", 2)[2] for k in set(diffusers) - set(renamed)}) == [
        "attn2.norm_q.bias",
        "attn2.norm_q.weight",
        "attn2.to_q.weight",
    ]


def test_architecture_read_off_the_released_shapes():
    config = config_from_original(released("keys_original_next_dit_2b.json"), Path("consolidated.00-of-01.pth"))
    assert config == RELEASED
    assert (config.head_dim, config.ffn_dim, config.cond_dim, config.base_sequence_length) == (72, 6144, 1024, 4096)


def test_every_problem_is_listed_at_once():
    tensors = released("keys_diffusers_transformer_2b.json")
    del tensors["layers.4.attn1.to_k.weight"], tensors["pad_token"]
    tensors["layers.2.feed_forward.linear_1.weight"] = ShapeOnly((6144, 2048))
    tensors["layers.24.gate"] = ShapeOnly((32,))
    tensors["lora.up.weight"] = ShapeOnly((4, 4))
    with pytest.raises(ValueError) as error:
        plan_import(TransformerCheckpoint(Path("/models/broken"), RELEASED, tensors, "diffusers"))
    message = str(error.value)
    assert "/models/broken" in message
    assert "unknown keys (2): layers.24.gate, lora.up.weight" in message
    assert "missing parameters (2): layers.attention.to_k.kernel (layer 4), pad_token" in message
    assert "layers.2.feed_forward.linear_1.weight (6144, 2048) (expected (6144, 2304))" in message

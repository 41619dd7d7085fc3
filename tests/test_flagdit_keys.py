"""The Flag-DiT (Lumina-T2I) key map, checked against the key and shape list of the released 5B checkpoint."""

from pathlib import Path

import pytest
from reference import ShapeOnly, released

from lumina_jax.models import flagdit
from lumina_jax.weights.flagdit_keys import original_key_to_target
from lumina_jax.weights.importer import LINEAR, Target, UnknownKeyError
from lumina_jax.weights.nextdit import TransformerCheckpoint, config_from_original, plan_import

RELEASED = flagdit.PRESETS["DiT_Llama_5B_patch2"]


def test_examples():
    assert original_key_to_target("layers.3.attention.wq.weight") == Target(
        ("layers", "attention", "to_q", "kernel"), 3, LINEAR
    )
    assert original_key_to_target("layers.0.attention.ky_norm.bias") == Target(
        ("layers", "attention", "k_caption_norm", "bias"), 0
    )
    assert original_key_to_target("layers.31.attention.gate") == Target(("layers", "attention", "gate"), 31)
    assert original_key_to_target("layers.2.attention_y_norm.weight") == Target(("layers", "caption_norm", "scale"), 2)
    assert original_key_to_target("layers.2.feed_forward.w2.weight") == Target(
        ("layers", "feed_forward", "down", "kernel"), 2, LINEAR
    )
    assert original_key_to_target("final_layer.adaLN_modulation.1.bias") == Target(("final_modulation", "bias"))
    assert original_key_to_target("eol_token") == Target(("eol_token",))


@pytest.mark.parametrize(
    "key",
    [
        "layers.0.attention.wq.bias",  # the original's projections have no biases
        "layers.0.attention_norm.bias",  # nor its RMSNorms
        "layers.0.attention.wk_x.weight",
        "final_layer.norm_final.weight",
        "layers.x.attention.gate",
        "x_embedder.proj.weight",
    ],
)
def test_unknown_keys_raise(key):
    with pytest.raises(UnknownKeyError):
        original_key_to_target(key)


def test_architecture_read_off_the_released_shapes():
    config = config_from_original(released("keys_original_flag_dit_5b.json"), Path("consolidated.00-of-01.pth"))
    assert config == RELEASED
    assert (config.head_dim, config.ffn_dim, config.cond_dim, config.out_channels) == (96, 8192, 1024, 8)


def test_released_keys_cover_every_parameter():
    original = released("keys_original_flag_dit_5b.json")
    plan = plan_import(TransformerCheckpoint(Path("consolidated.00-of-01.pth"), RELEASED, original, "original"))
    assert len(plan) == len(original) == 2 + 14 + 32 * 21  # tokens, embedders and final layer, 32 blocks


def test_every_problem_is_listed_at_once():
    tensors = released("keys_original_flag_dit_5b.json")
    del tensors["layers.4.attention.wk.weight"], tensors["eol_token"]
    tensors["layers.2.feed_forward.w1.weight"] = ShapeOnly((6144, 3072))
    tensors["layers.0.attention.wq.bias"] = ShapeOnly((3072,))
    with pytest.raises(ValueError) as error:
        plan_import(TransformerCheckpoint(Path("/models/t2i"), RELEASED, tensors, "original"))
    message = str(error.value)
    for expected in ("to_k.kernel (layer 4)", "eol_token", "layers.2.feed_forward.w1.weight", "wq.bias"):
        assert expected in message

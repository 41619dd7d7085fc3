"""Flag-DiT (Lumina-T2I) against the original `DiT_Llama`: outputs the original code computed from a tiny
checkpoint in its own layout, every parameter random (tests/fixtures/lumina_t2i_original_tiny/, written by
tests/fixtures/make_lumina_t2i_original_tiny.py), loaded through the real import path."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from reference import relative_error

from lumina_jax import load_transformer
from lumina_jax.models.flagdit import FlagDiT, flag_tokens, unflag_tokens

FIXTURES = Path(__file__).parent / "fixtures" / "lumina_t2i_original_tiny"
FLOAT32_BOUND = 1e-5
BFLOAT16_BOUND = 2e-2  # bfloat16 compute and weights against the float32 reference, as Next-DiT's tier


@pytest.fixture(scope="module", params=["qk", "plain"])
def original(request):
    folder = FIXTURES / request.param
    return folder, json.loads((folder / "constructor_args.json").read_text()), dict(np.load(folder / "io.npz"))


def first_channels(ours, arguments: dict) -> np.ndarray:
    """What the original returns: the first in_channels of ours (it drops the learned sigma)."""
    return np.asarray(ours)[..., : arguments["in_channels"], :, :]


def test_the_checkpoint_loads_as_flag_dit_with_the_original_architecture(original):
    folder, arguments, _ = original
    model = load_transformer(folder, "float32", progress=False)
    assert isinstance(model, FlagDiT)
    expected = dict(
        patch_size=arguments["patch_size"],
        in_channels=arguments["in_channels"],
        hidden_size=arguments["dim"],
        num_layers=arguments["n_layers"],
        num_attention_heads=arguments["n_heads"],
        learn_sigma=arguments["learn_sigma"],
        qk_norm=arguments["qk_norm"],
        cross_attention_dim=arguments["cap_feat_dim"],
    )
    assert {k: getattr(model.config, k) for k in expected} == expected
    assert model.config.sample_size == 32  # model_args.pth: image_size 256
    # the original's FeedForward width: 2/3 of 4 x dim, times the multiplier, rounded up to multiple_of
    width = int(2 * 4 * arguments["dim"] / 3)
    width = int(arguments.get("ffn_dim_multiplier", 1) * width)
    assert model.config.ffn_dim == arguments["multiple_of"] * -(-width // arguments["multiple_of"])


@pytest.mark.parametrize("dtype, bound", [("float32", FLOAT32_BOUND), ("bfloat16", BFLOAT16_BOUND)])
def test_forward_matches_the_original(original, dtype, bound):
    folder, arguments, io = original
    model = load_transformer(folder, dtype, progress=False)
    inputs = [jnp.asarray(io[k]) for k in ("a_x", "a_t", "a_cap", "a_cap_mask")]
    ours = model(*inputs)
    assert ours.shape == (2, model.config.out_channels, 12, 20)
    assert relative_error(first_channels(ours, arguments), io["a_out"]) <= bound
    # RoPE scaled linearly (2) and by NTK (3), proportional attention over a base of 30 tokens
    ours = model(*inputs, linear_factor=2.0, ntk_factor=3.0, base_sequence_length=30)
    assert relative_error(first_channels(ours, arguments), io["b_out"]) <= bound
    assert relative_error(io["a_out"], io["b_out"]) > 10 * BFLOAT16_BOUND  # the factors do change the output


def test_images_of_different_sizes_in_one_padded_batch_match_the_original(original):
    folder, arguments, io = original
    model = load_transformer(folder, "float32", progress=False)
    images = [jnp.asarray(io[f"c_x{i}"]) for i in range(3)]
    patches, end_of_line, token_mask = flag_tokens(images, model.config.patch_size)
    assert token_mask is not None and not bool(token_mask.all())
    out = model.forward_tokens(
        patches,
        end_of_line,
        token_mask,
        model.rope(patches.shape[1]),
        jnp.asarray(io["c_t"]),
        jnp.asarray(io["c_cap"]),
        jnp.asarray(io["c_cap_mask"]),
    )
    for i, image in enumerate(images):
        ours = unflag_tokens(out[i : i + 1], *image.shape[1:], model.config.patch_size)[0]
        assert relative_error(first_channels(ours[None], arguments)[0], io[f"c_out{i}"]) <= FLOAT32_BOUND


def test_token_layout_rows_closed_by_end_of_line_then_padding():
    images = [jnp.zeros((4, 4, 6)), jnp.zeros((4, 2, 2))]  # patch 2: 2 rows of 3 (+1), 1 row of 1 (+1)
    patches, end_of_line, token_mask = flag_tokens(images, 2)
    assert patches.shape == (2, 8, 16)
    np.testing.assert_array_equal(end_of_line, [[0, 0, 0, 1, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(token_mask, [[1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]])
    tokens = jnp.arange(2 * 8 * 4, dtype=jnp.float32).reshape(2, 8, 4)  # p*p*C = 4: one channel
    image = unflag_tokens(tokens, 4, 6, 2)
    assert image.shape == (2, 1, 4, 6)
    np.testing.assert_array_equal(image[0, 0, :2, :2], [[0, 1], [2, 3]])  # token 0: (ph, pw) = features
    np.testing.assert_array_equal(image[0, 0, 2:, :2], [[16, 17], [18, 19]])  # row 2 starts after the eol slot


@pytest.mark.parametrize("options", [dict(scan_layers=False), dict(remat="full")])
def test_precomputed_caption_keys_values_and_layer_options_match_the_original(original, options):
    folder, arguments, io = original
    model = load_transformer(folder, "float32", progress=False, **options)
    x, t, caption, mask = (jnp.asarray(io[k]) for k in ("a_x", "a_t", "a_cap", "a_cap_mask"))
    ours = model(x, t, caption, mask, caption_kv=model.caption_keys_values(caption))
    assert relative_error(first_channels(ours, arguments), io["a_out"]) <= FLOAT32_BOUND

"""Unified Next-DiT (Lumina-Image 2.0) against diffusers' Lumina2Transformer2DModel, every parameter randomised,
through the real import path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from flax import nnx
from reference import randomize_, relative_error

from lumina_jax import load_transformer
from lumina_jax.models.dit_blocks import unpatchify
from lumina_jax.models.lumina2 import UnifiedNextDiTConfig
from lumina_jax.weights.nextdit import save_transformer

# Odd sizes: 5 heads over 1 kv head of 24 (RoPE axes 4 + 10 + 10), a FFN multiplier, 36 caption features;
# 6 heads over 2 kv heads of 16 with short RoPE tables and 12 output channels from 8.
CONFIGS = {
    "odd": dict(
        hidden_size=120,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=5,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=1.3,
        in_channels=4,
        axes_dim_rope=(4, 10, 10),
        cap_feat_dim=36,
    ),
    "gqa_short_tables": dict(
        hidden_size=96,
        num_layers=3,
        num_refiner_layers=2,
        num_attention_heads=6,
        num_kv_heads=2,
        multiple_of=32,
        in_channels=8,
        out_channels=12,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(24, 16, 16),
        cap_feat_dim=40,
        norm_eps=1e-6,
    ),
}
# (batch, latent height, width, caption length, real caption tokens per row)
CASES = {
    "captions_of_different_lengths_wide": (3, 6, 10, 7, [7, 2, 5]),
    "equal_padded_captions_square": (2, 8, 8, 6, [4, 4]),
    "full_caption_tall": (1, 10, 4, 5, [5]),
}
FLOAT32_BOUND = 1e-5
BFLOAT16_BOUND = 2e-2  # bfloat16 compute and weights against the float32 reference, as test_nextdit_parity's


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved_transformer(request, tmp_path_factory):
    reference = randomize_(Lumina2Transformer2DModel(**CONFIGS[request.param]).eval(), seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, folder


def _inputs(seed: int, config: dict, batch: int, height: int, width: int, length: int, valid: list[int]):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, config["in_channels"], height, width), dtype=np.float32)
    t = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    caption = rng.standard_normal((batch, length, config["cap_feat_dim"]), dtype=np.float32)
    mask = (np.arange(length)[None] < np.asarray(valid)[:, None]).astype(np.int64)
    return x, t, caption, mask


def _reference(model, x, t, caption, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(*(torch.from_numpy(np.asarray(a)) for a in (x, t, caption, mask)), return_dict=False)[0]
    return out.float().numpy()


def _run_case(model, reference, config, case, precompute_caption=False) -> float:
    x, t, caption, mask = _inputs(7, config, *CASES[case])
    expected = _reference(reference, x, t, caption, mask)
    args = [jnp.asarray(a) for a in (x, t, caption, mask)]
    extra = {"caption_kv": model.caption_keys_values(args[2], args[3])} if precompute_caption else {}
    ours = model(*args, **extra)
    assert ours.shape == expected.shape
    return relative_error(ours, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_diffusers(saved_transformer, case):
    name, reference, folder = saved_transformer
    model = load_transformer(folder, dtype="float32", progress=False)
    assert type(model.config) is UnifiedNextDiTConfig
    assert _run_case(model, reference, CONFIGS[name], case) <= FLOAT32_BOUND


@pytest.mark.parametrize("scan_layers", [True, False])
def test_precomputed_caption_matches_diffusers(saved_transformer, scan_layers):
    name, reference, folder = saved_transformer
    model = load_transformer(folder, dtype="float32", scan_layers=scan_layers, progress=False)
    case = "captions_of_different_lengths_wide"
    assert _run_case(model, reference, CONFIGS[name], case, precompute_caption=True) <= FLOAT32_BOUND


@pytest.mark.parametrize("case", ["captions_of_different_lengths_wide", "equal_padded_captions_square"])
def test_bfloat16_within_tier(saved_transformer, case):
    name, reference, folder = saved_transformer
    model = load_transformer(folder, dtype="bfloat16", progress=False)
    assert _run_case(model, reference, CONFIGS[name], case) <= BFLOAT16_BOUND


def test_images_of_several_sizes_in_one_batch_match_each_alone(saved_transformer):
    """diffusers takes one size per batch; the original code (and our trainer) pads smaller images' tokens
    and masks them in the noise refiner. Each image of a mixed batch must get what diffusers gives it alone."""
    name, reference, folder = saved_transformer
    config = CONFIGS[name]
    model = load_transformer(folder, dtype="float32", progress=False)
    sizes, valid = [(6, 10), (8, 4), (4, 4)], [5, 7, 2]
    x, t, caption, mask = _inputs(5, config, 3, 1, 1, 7, valid)
    rng = np.random.default_rng(6)
    latents = [rng.standard_normal((config["in_channels"], h, w), dtype=np.float32) for h, w in sizes]
    sequence = model.config.token_sequence([jnp.asarray(latent) for latent in latents])
    out = model.forward_sequence(*sequence, jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask))
    p = model.config.patch_size
    for i, ((h, w), latent) in enumerate(zip(sizes, latents)):
        ours = unpatchify(out[i : i + 1, : (h // p) * (w // p)], h, w, p)
        expected = _reference(reference, latent[None], t[i : i + 1], caption[i : i + 1], mask[i : i + 1])
        assert relative_error(ours, expected) <= FLOAT32_BOUND, (sizes[i], valid[i])


def test_unrolled_and_rematerialised_layers_match_scan(saved_transformer):
    name, _, folder = saved_transformer
    x, t, caption, mask = _inputs(3, CONFIGS[name], 2, 4, 6, 5, [5, 2])
    args = [jnp.asarray(a) for a in (x, t, caption, mask)]
    scanned = load_transformer(folder, progress=False)(*args)
    for options in (dict(scan_layers=False), dict(remat="full"), dict(remat="attention_ffn"), dict(remat="dots")):
        other = load_transformer(folder, progress=False, **options)(*args)
        np.testing.assert_allclose(
            np.asarray(other), np.asarray(scanned), rtol=0, atol=1e-5 * float(np.abs(scanned).max())
        )


def test_remat_policies_give_the_gradients_of_no_remat(saved_transformer):
    """Rematerialisation only changes what the backward pass recomputes."""
    name, _, folder = saved_transformer
    x, t, caption, mask = _inputs(4, CONFIGS[name], 2, 4, 6, 5, [5, 2])
    args = [jnp.asarray(a) for a in (x, t, caption, mask)]

    def gradients(remat):
        graphdef, params = nnx.split(load_transformer(folder, progress=False, remat=remat))
        loss = lambda params: jnp.sum(nnx.merge(graphdef, params)(*args) ** 2)  # noqa: E731
        return np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params))])

    expected = gradients("none")
    for remat in ("full", "attention_ffn", "dots"):
        assert relative_error(gradients(remat), expected) <= 1e-5, remat


def test_saved_diffusers_folder_loads_in_diffusers(saved_transformer, tmp_path):
    """Our export writes every key diffusers has, under its names and layouts."""
    name, reference, folder = saved_transformer
    model = load_transformer(folder, progress=False)
    save_transformer(model, tmp_path / "out")
    reloaded = Lumina2Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert tuple(reloaded.config.axes_dim_rope) == tuple(reference.config.axes_dim_rope)
    for (key, ours), (ref_key, theirs) in zip(reloaded.state_dict().items(), reference.state_dict().items()):
        assert key == ref_key
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=key)

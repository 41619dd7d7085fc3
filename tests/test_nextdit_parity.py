"""Next-DiT against diffusers' LuminaNextDiT2DModel, every parameter randomised, through the real import path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import inputs, random_transformer, relative_error, transformer_forward

from lumina_jax import load_transformer

CONFIGS = {
    "tiny": dict(
        hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=4, multiple_of=16, cross_attention_dim=32
    ),
    "odd": dict(
        hidden_size=144,
        num_layers=3,
        num_attention_heads=6,
        num_kv_heads=2,
        multiple_of=32,
        cross_attention_dim=40,
        ffn_dim_multiplier=1.3,
    ),
    "released_widths": dict(
        hidden_size=2304,
        num_layers=2,
        num_attention_heads=32,
        num_kv_heads=8,
        multiple_of=256,
        cross_attention_dim=2048,
    ),
}
# (batch, latent height, width, caption length, valid caption tokens, linear, ntk, proportional base)
CASES = {
    "square": (2, 16, 16, 8, [8, 3], 1.0, 1.0, None),
    "wide_linear_proportional": (2, 12, 20, 9, [5, 9], 1.5, 1.0, 16),
    "tall_ntk_proportional": (1, 20, 8, 6, [4], 1.0, 2.0, 4096),
}
FLOAT32_BOUND = 1e-5
BFLOAT16_BOUND = 2e-2  # bfloat16 compute and weights against the float32 reference (measured: see the note)


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved_transformer(request, tmp_path_factory):
    reference = random_transformer(seed=len(request.param), **CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, folder


def _run_case(model, reference, config, case, precompute_caption_kv=False):
    batch, height, width, length, valid, linear, ntk, base = CASES[case]
    x, t, caption, mask = inputs(7, batch, height, width, length, config["cross_attention_dim"], valid)
    factors = dict(linear_factor=linear, ntk_factor=ntk, base_sequence_length=base)
    expected = transformer_forward(reference, x, t, caption, mask, **factors)
    # precompute_caption_kv: as the sampler does, once per image
    extra = {"caption_kv": model.caption_keys_values(jnp.asarray(caption))} if precompute_caption_kv else {}
    ours = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask), **factors, **extra)
    assert ours.shape == expected.shape
    return relative_error(ours, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_diffusers(saved_transformer, case):
    name, reference, folder = saved_transformer
    model = load_transformer(folder, dtype="float32", progress=False)
    assert _run_case(model, reference, CONFIGS[name], case) <= FLOAT32_BOUND


@pytest.mark.parametrize("scan_layers", [True, False])
def test_precomputed_caption_keys_values_match_diffusers(saved_transformer, scan_layers):
    name, reference, folder = saved_transformer
    model = load_transformer(folder, dtype="float32", scan_layers=scan_layers, progress=False)
    assert _run_case(model, reference, CONFIGS[name], "wide_linear_proportional", precompute_caption_kv=True) <= (
        FLOAT32_BOUND
    )


@pytest.mark.parametrize("case", ["square", "wide_linear_proportional"])
def test_bfloat16_within_tier(saved_transformer, case):
    name, reference, folder = saved_transformer
    model = load_transformer(folder, dtype="bfloat16", progress=False)
    assert _run_case(model, reference, CONFIGS[name], case) <= BFLOAT16_BOUND


def test_unrolled_and_rematerialised_layers_match_scan(saved_transformer):
    name, reference, folder = saved_transformer
    x, t, caption, mask = inputs(3, 2, 8, 12, 5, CONFIGS[name]["cross_attention_dim"], [5, 2])
    args = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask))
    scanned = load_transformer(folder, progress=False)(*args)
    for options in (dict(scan_layers=False), *(dict(remat=r) for r in ("full", "offload", "attention_ffn", "dots"))):
        other = load_transformer(folder, progress=False, **options)(*args)
        np.testing.assert_allclose(
            np.asarray(other), np.asarray(scanned), rtol=0, atol=1e-5 * float(np.abs(scanned).max())
        )


# Five backward passes each: the two small configs (the released widths' forward is checked above).
@pytest.mark.parametrize("saved_transformer", ["tiny", "odd"], indirect=True)
def test_remat_policies_give_the_loss_and_gradients_of_no_remat(saved_transformer):
    """Rematerialisation only changes what the backward pass recomputes, and "offload" where it keeps the
    layer inputs: in host memory, in JAX's program. On the CPU the host's memory is the device's, so the
    copies lower to nothing; tests/test_tpu_training.py checks that the TPU compiler places them on the host."""
    name, _, folder = saved_transformer
    x, t, caption, mask = inputs(4, 2, 8, 12, 5, CONFIGS[name]["cross_attention_dim"], [5, 2])
    args = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask))

    def run(remat):
        graphdef, params = nnx.split(load_transformer(folder, progress=False, remat=remat))
        loss = lambda params: jnp.sum(nnx.merge(graphdef, params)(*args) ** 2)  # noqa: E731
        on_host = "<host>" in str(jax.make_jaxpr(jax.value_and_grad(loss))(params))
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return on_host, float(value), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    runs = {remat: run(remat) for remat in ("none", "full", "offload", "attention_ffn", "dots")}
    assert [remat for remat, (on_host, _, _) in runs.items() if on_host] == ["offload"]
    for remat, expected in (
        ("full", "none"),
        ("offload", "none"),
        ("offload", "full"),
        ("attention_ffn", "none"),
        ("dots", "none"),
    ):  # XLA may fuse the recomputation differently: float32 rounding
        (_, loss, gradients), (_, expected_loss, expected_gradients) = runs[remat], runs[expected]
        assert abs(loss - expected_loss) <= 1e-6 * abs(expected_loss), (remat, expected)
        assert relative_error(gradients, expected_gradients) <= 1e-5, (remat, expected)

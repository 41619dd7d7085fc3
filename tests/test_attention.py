"""Attention: the XLA path against a float64 NumPy statement of the formula, masks, gradients; Pallas
splash attention (in interpret mode) against XLA; and the choice of backend (cuDNN only where it
supports the dtype and head size, splash by default on TPUs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax.models.attention import (
    cudnn_supports,
    dot_product_attention,
    dual_attention,
    resolve_backend,
    target_platform,
)

BATCH, TOKENS, CAPTION, HEADS, KV_HEADS, HEAD_DIM = 2, 12, 7, 6, 2, 8


def numpy_attention(q, k, v, scale, mask):
    """softmax(scale q k^T) v with kv heads repeated for their query heads, float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    repeat = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, repeat, axis=2), np.repeat(v, repeat, axis=2)
    logits = scale * np.einsum("bthd,bshd->bhts", q, k)
    if mask is not None:
        logits = np.where(np.asarray(mask, bool)[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", weights / weights.sum(axis=-1, keepdims=True), v)


def random_inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    normal = lambda key, *shape: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
    return dict(
        query=normal(keys[0], BATCH, TOKENS, HEADS, HEAD_DIM),
        key=normal(keys[1], BATCH, TOKENS, KV_HEADS, HEAD_DIM),
        value=normal(keys[2], BATCH, TOKENS, KV_HEADS, HEAD_DIM),
        caption_key=normal(keys[3], BATCH, CAPTION, KV_HEADS, HEAD_DIM),
        caption_value=normal(keys[4], BATCH, CAPTION, KV_HEADS, HEAD_DIM),
        caption_gate=jnp.tanh(normal(keys[5], HEADS)),
    )


def numpy_dual(inputs, scale, caption_scale, kv_mask, caption_mask):
    image = numpy_attention(inputs["query"], inputs["key"], inputs["value"], scale, kv_mask)
    caption_query = inputs.get("caption_query", inputs["query"])
    text = numpy_attention(caption_query, inputs["caption_key"], inputs["caption_value"], caption_scale, caption_mask)
    return image + np.asarray(inputs["caption_gate"], np.float64)[:, None] * text


@pytest.mark.parametrize("backend", ["xla", "splash"])
def test_a_caption_query_of_its_own_replaces_the_query_in_the_caption_branch(backend):
    inputs = random_inputs(7)
    inputs["caption_query"] = jax.random.normal(jax.random.key(8), inputs["query"].shape)
    caption_mask = np.arange(CAPTION)[None] < np.array([[5], [2]])
    kwargs = dict(scale=0.4, caption_scale=HEAD_DIM**-0.5, kv_mask=None, caption_mask=caption_mask)
    ours = dual_attention(**inputs, **kwargs, backend=backend)
    expected = numpy_dual(inputs, **kwargs)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("masked", [False, True])
def test_dual_attention_matches_the_formula(masked):
    inputs = random_inputs()
    kv_mask = np.arange(TOKENS)[None] < np.array([[TOKENS], [9]]) if masked else None
    caption_mask = np.arange(CAPTION)[None] < np.array([[5], [1]])
    ours = dual_attention(
        **inputs, scale=0.4, caption_scale=HEAD_DIM**-0.5, kv_mask=kv_mask, caption_mask=caption_mask, backend="xla"
    )
    expected = numpy_dual(inputs, 0.4, HEAD_DIM**-0.5, kv_mask, caption_mask)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_dot_product_attention_matches_the_formula_and_keeps_the_dtype():
    inputs = random_inputs(1)
    mask = np.arange(TOKENS)[None] < np.array([[3], [TOKENS]])
    for dtype, tolerance in ((jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)):
        q, k, v = (inputs[name].astype(dtype) for name in ("query", "key", "value"))
        ours = dot_product_attention(q, k, v, scale=0.3, kv_mask=mask, backend="xla")
        expected = numpy_attention(inputs["query"], inputs["key"], inputs["value"], 0.3, mask)
        assert ours.dtype == dtype
        np.testing.assert_allclose(np.asarray(ours, np.float32), expected, atol=tolerance * np.abs(expected).max())


def test_fully_masked_caption_attends_uniformly_instead_of_nan():
    inputs = random_inputs(2)
    ours = dual_attention(**inputs, scale=0.3, caption_mask=np.zeros((BATCH, CAPTION), bool), backend="xla")
    mean_value = np.repeat(np.asarray(inputs["caption_value"]).mean(axis=1), HEADS // KV_HEADS, axis=1)
    expected = numpy_attention(inputs["query"], inputs["key"], inputs["value"], 0.3, None)
    expected += np.asarray(inputs["caption_gate"])[:, None] * mean_value[:, None]
    np.testing.assert_allclose(ours, expected, atol=2e-6 * np.abs(expected).max())


def test_gradients_match_the_formula():
    """Training differentiates through the deferred normalisation and the stopped maximum."""
    inputs = random_inputs(3)
    mask = np.arange(CAPTION)[None] < np.array([[4], [CAPTION]])
    cotangent = jax.random.normal(jax.random.key(9), (BATCH, TOKENS, HEADS, HEAD_DIM))

    def ours(query, caption_key):
        out = dual_attention(
            **{**inputs, "query": query, "caption_key": caption_key}, scale=0.5, caption_mask=mask, backend="xla"
        )
        return jnp.sum(out * cotangent)

    def reference(query, caption_key):
        repeat = HEADS // KV_HEADS

        def attend(k, v, scale, keep):
            k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
            logits = scale * jnp.einsum("bthd,bshd->bhts", query, k)
            if keep is not None:
                logits = jnp.where(keep[:, None, None, :], logits, -jnp.inf)
            return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)

        out = attend(inputs["key"], inputs["value"], 0.5, None)
        out += inputs["caption_gate"][:, None] * attend(caption_key, inputs["caption_value"], 1.0, mask)
        return jnp.sum(out * cotangent)

    args = (inputs["query"], inputs["caption_key"])
    for got, want in zip(jax.grad(ours, (0, 1))(*args), jax.grad(reference, (0, 1))(*args)):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_cudnn_only_where_it_supports_the_inputs():
    query = jnp.zeros((1, 4, 2, 72), jnp.bfloat16)
    assert cudnn_supports(query, max_head_dim=128)
    assert not cudnn_supports(query.astype(jnp.float32), max_head_dim=128)  # cuDNN flash needs half precision
    assert not cudnn_supports(jnp.zeros((1, 4, 2, 60), jnp.bfloat16), max_head_dim=128)  # not a multiple of 8
    assert not cudnn_supports(jnp.zeros((1, 4, 2, 192), jnp.bfloat16), max_head_dim=128)
    assert cudnn_supports(jnp.zeros((1, 4, 2, 192), jnp.bfloat16), max_head_dim=256)
    assert resolve_backend(query.astype(jnp.float32), "cudnn") == "xla"
    assert resolve_backend(query, "xla") == "xla"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend(query, "flash")


@pytest.mark.parametrize(
    "tokens, masked",
    [(TOKENS, False), (TOKENS, True), (128, False)],  # 128 tokens: no sequence padding, no segment ids
)
def test_splash_matches_xla(tokens, masked):
    """Pallas splash attention in interpret mode: GQA heads, head_dim 8 padded to 128, padded and masked keys."""
    inputs = random_inputs(4)
    if tokens != TOKENS:
        grow = jax.random.normal(jax.random.key(5), (BATCH, tokens, KV_HEADS + HEADS, HEAD_DIM))
        inputs.update(query=grow[:, :, :HEADS], key=grow[:, :, HEADS:], value=grow[:, ::-1, HEADS:])
    kv_mask = np.arange(tokens)[None] < np.array([[tokens], [9]]) if masked else None
    caption_mask = np.arange(CAPTION)[None] < np.array([[5], [1]])
    kwargs = dict(scale=0.4, caption_scale=HEAD_DIM**-0.5, kv_mask=kv_mask, caption_mask=caption_mask)
    splash = dual_attention(**inputs, **kwargs, backend="splash")
    xla = dual_attention(**inputs, **kwargs, backend="xla")
    assert splash.dtype == jnp.float32 and splash.shape == (BATCH, tokens, HEADS, HEAD_DIM)
    np.testing.assert_allclose(splash, xla, rtol=0, atol=2e-6 * np.abs(xla).max())
    np.testing.assert_allclose(splash, numpy_dual(inputs, **kwargs), rtol=0, atol=2e-6 * np.abs(xla).max())


def test_splash_dot_product_attention_and_gradients_match_xla():
    inputs = random_inputs(5)
    mask = np.arange(TOKENS)[None] < np.array([[3], [TOKENS]])
    q, k, v = (inputs[name] for name in ("query", "key", "value"))
    splash = dot_product_attention(q, k, v, scale=0.3, kv_mask=mask, backend="splash")
    np.testing.assert_allclose(splash, numpy_attention(q, k, v, 0.3, mask), atol=2e-6 * np.abs(splash).max())

    cotangent = jax.random.normal(jax.random.key(6), (BATCH, TOKENS, HEADS, HEAD_DIM))

    def loss(query, key, backend):
        return jnp.sum(dot_product_attention(query, key, v, scale=0.3, kv_mask=mask, backend=backend) * cotangent)

    grads = {backend: jax.grad(loss, (0, 1))(q, k, backend) for backend in ("splash", "xla")}
    for got, want in zip(grads["splash"], grads["xla"]):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_splash_fully_masked_caption_stays_finite():
    inputs = random_inputs(2)
    out = dual_attention(**inputs, scale=0.3, caption_mask=np.zeros((BATCH, CAPTION), bool), backend="splash")
    assert np.isfinite(np.asarray(out)).all()


def test_splash_is_the_default_on_tpu(monkeypatch):
    query = jnp.zeros((1, 4, 2, 72), jnp.bfloat16)
    assert resolve_backend(query, None) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_backend(query, None) == "splash"
    assert resolve_backend(query.astype(jnp.float32), "splash") == "splash"  # any dtype, any head size


@pytest.mark.parametrize("platform, kernel", [("cpu", "xla"), ("gpu", "cudnn"), ("tpu", "splash")])
def test_each_platform_gets_its_kernel(platform, kernel):
    query = jnp.zeros((1, 4, 2, 72), jnp.bfloat16)
    assert resolve_backend(query, None, platform) == kernel
    assert resolve_backend(query, "xla", platform) == "xla"  # the caller's choice wins


def test_a_given_mesh_says_the_platform_over_the_ambient_one():
    assert target_platform() == jax.default_backend() == "cpu"  # no ambient mesh: this host
    cpu_mesh = jax.make_mesh((1,), ("data",))
    tpu_mesh = jax.sharding.AbstractMesh(
        (1,),
        ("data",),
        abstract_device=jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu"),
    )
    assert target_platform(tpu_mesh) == "tpu"
    with jax.set_mesh(cpu_mesh):
        assert target_platform() == "cpu" and target_platform(tpu_mesh) == "tpu"

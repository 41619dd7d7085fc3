"""The attention functions of the project, with a backend switch.

Grouped-query attention is computed with the query heads grouped by their kv head (query head h
reads kv head h // (heads / kv_heads)), so kv heads are never repeated in memory. Softmax runs in
float32. On GPUs cuDNN's fused kernel is used where it supports the shapes; elsewhere, and as the
fallback, XLA's dot products.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Backend = Literal["xla", "cudnn"]
BACKENDS = ("xla", "cudnn")
# cuDNN's flash attention: half-precision inputs, head_dim a multiple of 8 and at most 128 (256 from Hopper on).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def default_backend() -> Backend:
    """cuDNN's fused attention on GPUs, XLA's elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def cudnn_supports(query: jax.Array, max_head_dim: int | None = None) -> bool:
    """Whether cuDNN's flash attention takes a query [B, T, heads, D] of this dtype and head size.

    max_head_dim defaults to what the first device allows: 256 from compute capability 9.0, else 128.
    """
    if max_head_dim is None:
        capability = getattr(jax.devices()[0], "compute_capability", "0")
        max_head_dim = 256 if float(capability) >= 9.0 else 128
    head_dim = query.shape[-1]
    return query.dtype in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= max_head_dim


def resolve_backend(query: jax.Array, backend: Backend | None) -> Backend:
    """The backend that will run: cuDNN falls back to XLA for shapes and dtypes it does not support."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
    if backend == "cudnn" and not cudnn_supports(query):
        return "xla"
    return backend


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float,
    kv_mask: jax.Array | None = None,
    backend: Backend | None = None,
) -> jax.Array:
    """query [B, T, heads, D], key/value [B, S, kv_heads, D] -> [B, T, heads, D].

    kv_mask [B, S] marks the keys to attend to. With cuDNN it must be right-padded (valid keys
    first), as tokenizers and our padded batches produce, because cuDNN takes sequence lengths.
    """
    if resolve_backend(query, backend) == "cudnn":
        return _cudnn_attention(query, key, value, scale, kv_mask)
    return dual_attention(query, key, value, scale=scale, kv_mask=kv_mask, backend="xla").astype(query.dtype)


def dual_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    caption_key: jax.Array | None = None,
    caption_value: jax.Array | None = None,
    *,
    scale: float,
    caption_scale: float = 1.0,
    caption_gate: jax.Array | None = None,
    kv_mask: jax.Array | None = None,
    caption_mask: jax.Array | None = None,
    backend: Backend | None = None,
) -> jax.Array:
    """Self-attention plus gated cross-attention with one query, as Next-DiT mixes them:

        softmax(scale q k^T) v + caption_gate * softmax(caption_scale q ck^T) cv

    query [B, T, heads, D]; key/value [B, S, kv_heads, D]; caption_key/value [B, L, kv_heads, D];
    caption_gate [heads]; kv_mask [B, S] and caption_mask [B, L] mark the keys to attend to.
    Returns [B, T, heads, D] in float32. With XLA, a segment whose keys are all masked is attended
    uniformly (finite) rather than giving NaN.
    """
    if resolve_backend(query, backend) == "cudnn":
        out = _cudnn_attention(query, key, value, scale, kv_mask).astype(jnp.float32)
        if caption_key is None:
            return out
        caption = _cudnn_attention(query, caption_key, caption_value, caption_scale, caption_mask)
        return out + caption_gate[:, None] * caption.astype(jnp.float32)

    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads evenly")
    groups = heads // kv_heads
    # The query heads that share a kv head become rows of one matrix: [B, kv_heads, T * groups, D],
    # the layout of a batched matmul, so neither the scores nor the probabilities are transposed.
    grouped = query.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
    grouped = grouped.reshape(batch, kv_heads, length * groups, head_dim)
    out = _grouped_attention(grouped, key, value, scale, kv_mask)
    out = out.reshape(batch, kv_heads, length, groups, head_dim)
    if caption_key is not None:
        caption = _grouped_attention(grouped, caption_key, caption_value, caption_scale, caption_mask)
        gate = caption_gate.astype(jnp.float32).reshape(kv_heads, 1, groups, 1)
        out = out + gate * caption.reshape(out.shape)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, heads, head_dim)


def _grouped_attention(query, key, value, scale, mask):
    """query [B, K, M, D] (M: tokens x query heads per kv head), key/value [B, S, K, D], mask [B, S]
    -> [B, K, M, D] float32. The softmax is normalised after the product with the values, on
    [M, D] rather than on the [M, S] probabilities."""
    logits = jnp.einsum("bkmd,bskd->bkms", query, key, preferred_element_type=jnp.float32)
    if mask is not None:
        # The most negative finite float: a fully masked row stays finite (uniform), never NaN.
        logits = jnp.where(mask.astype(bool)[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    # softmax(scale * logits) without scaling the logits apart: exp(scale * (logits - max)), scale > 0.
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp((logits - peak) * scale)
    out = jnp.einsum("bkms,bskd->bkmd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    return out / jnp.sum(weights, axis=-1, keepdims=True)


def _cudnn_attention(query, key, value, scale, kv_mask):
    lengths = None if kv_mask is None else jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
    )

"""The one attention function of the project, with a backend switch.

`jax.nn.dot_product_attention` handles grouped-query attention natively (query head h reads
kv head h // (heads / kv_heads)), so kv heads are never repeated in memory. Softmax runs in float32.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Backend = Literal["xla", "cudnn"]


def default_backend() -> Backend:
    """cuDNN's fused attention on GPUs, XLA's elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


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
    backend = backend or default_backend()
    if backend == "cudnn":
        lengths = None if kv_mask is None else jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(
            query, key, value, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
        )
    if backend != "xla":
        raise ValueError(f"unknown attention backend {backend!r}; use 'xla' or 'cudnn'")
    mask = None if kv_mask is None else kv_mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(query, key, value, scale=scale, mask=mask, implementation="xla")

"""The attention functions of the project, with a backend switch, and Context Drop.

Grouped-query attention is computed with the query heads grouped by their kv head (query head h
reads kv head h // (heads / kv_heads)), so kv heads are never repeated in memory. Softmax runs in
float32. On GPUs cuDNN's fused kernel is used where it supports the shapes; on TPUs the Pallas
splash attention kernel; elsewhere, and as cuDNN's fallback, XLA's dot products. The platform and
the split of a fused kernel's work are the mesh's, given or else the ambient one (`jax.set_mesh`).
"""

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from lumina_jax.sharding import attention_partition

# A concrete or abstract mesh: the devices a program is for.
AnyMesh = jax.sharding.Mesh | jax.sharding.AbstractMesh
Backend = Literal["xla", "cudnn", "splash"]
BACKENDS = ("xla", "cudnn", "splash")
# cuDNN's flash attention: half-precision inputs, head_dim a multiple of 8 and at most 128 (256 from Hopper on).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Splash attention tiles: sequence blocks of 128-multiples up to this size; head_dim padded to 128-multiples.
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512


def default_backend(platform: str) -> Backend:
    """cuDNN's fused attention on GPUs, splash attention on TPUs, XLA's elsewhere."""
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")


def target_platform(mesh: AnyMesh | None = None) -> str:
    """The platform the program being traced will run on: the mesh's devices say (by default the
    ambient mesh's, so a program compiled for a TPU topology on another machine gets TPU kernels),
    else the default backend."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    device = mesh.abstract_mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def cudnn_supports(query: jax.Array, max_head_dim: int | None = None) -> bool:
    """Whether cuDNN's flash attention takes a query [B, T, heads, D] of this dtype and head size.

    max_head_dim defaults to what the first device allows: 256 from compute capability 9.0, else 128.
    """
    if max_head_dim is None:
        capability = getattr(jax.devices()[0], "compute_capability", "0")
        max_head_dim = 256 if float(capability) >= 9.0 else 128
    head_dim = query.shape[-1]
    return query.dtype in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= max_head_dim


def resolve_backend(query: jax.Array, backend: Backend | None, platform: str | None = None) -> Backend:
    """The backend that will run on `platform` (default: `target_platform()`): `backend`, else the
    platform's default; cuDNN falls back to XLA for shapes and dtypes it does not support.

    Splash attention takes any shape (it pads) and runs anywhere: off TPUs in Pallas' interpreter,
    which is exact but slow, for tests.
    """
    backend = backend or default_backend(platform or target_platform())
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
    mesh: AnyMesh | None = None,
) -> jax.Array:
    """query [B, T, heads, D], key/value [B, S, kv_heads, D] -> [B, T, heads, D].

    kv_mask [B, S] marks the keys to attend to. With cuDNN it must be right-padded (valid keys
    first), as tokenizers and our padded batches produce, because cuDNN takes sequence lengths.
    mesh (default: the ambient one) decides the platform and how a fused kernel splits its work.
    """
    backend = resolve_backend(query, backend, target_platform(mesh))
    if backend in FUSED_KERNELS:
        return FUSED_KERNELS[backend](query, key, value, scale, kv_mask, mesh).astype(query.dtype)
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
    caption_query: jax.Array | None = None,
    kv_mask: jax.Array | None = None,
    caption_mask: jax.Array | None = None,
    backend: Backend | None = None,
    mesh: AnyMesh | None = None,
) -> jax.Array:
    """Self-attention plus gated cross-attention with one query, as Next-DiT mixes them:

        softmax(scale q k^T) v + caption_gate * softmax(caption_scale q ck^T) cv

    query [B, T, heads, D]; key/value [B, S, kv_heads, D]; caption_key/value [B, L, kv_heads, D];
    caption_gate [heads]; kv_mask [B, S] and caption_mask [B, L] mark the keys to attend to; caption_mask
    may be [B, T, L], a mask per query token (regional captions), which only XLA takes: with a fused
    kernel the caption branch then runs in XLA. caption_query, where the caption branch has a query of
    its own, replaces q there. mesh (default: the ambient one) decides the platform and how a fused
    kernel splits its work.
    Returns [B, T, heads, D] in float32. With XLA, a segment whose keys are all masked is attended
    uniformly (finite) rather than giving NaN; with splash attention it is finite too, but averages
    over the kernel's zero padding as well.
    """
    backend = resolve_backend(query, backend, target_platform(mesh))
    if backend in FUSED_KERNELS:
        attend = functools.partial(FUSED_KERNELS[backend], mesh=mesh)
        out = attend(query, key, value, scale, kv_mask).astype(jnp.float32)
        if caption_key is None:
            return out
        caption_query = query if caption_query is None else caption_query
        if caption_mask is not None and caption_mask.ndim == 3:
            attend = functools.partial(dual_attention, backend="xla")
            caption = attend(caption_query, caption_key, caption_value, scale=caption_scale, kv_mask=caption_mask)
        else:
            caption = attend(caption_query, caption_key, caption_value, caption_scale, caption_mask)
        return out + caption_gate[:, None] * caption.astype(jnp.float32)

    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} kv heads evenly")
    groups = heads // kv_heads

    def grouped(q):
        # The query heads that share a kv head become rows of one matrix: [B, kv_heads, T * groups, D],
        # the layout of a batched matmul, so neither the scores nor the probabilities are transposed.
        q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
        return q.reshape(batch, kv_heads, length * groups, head_dim)

    grouped_query = grouped(query)
    out = _grouped_attention(grouped_query, key, value, scale, kv_mask)
    out = out.reshape(batch, kv_heads, length, groups, head_dim)
    if caption_key is not None:
        caption_query = grouped_query if caption_query is None else grouped(caption_query)
        caption = _grouped_attention(caption_query, caption_key, caption_value, caption_scale, caption_mask)
        gate = caption_gate.astype(jnp.float32).reshape(kv_heads, 1, groups, 1)
        out = out + gate * caption.reshape(out.shape)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, heads, head_dim)


def _grouped_attention(query, key, value, scale, mask):
    """query [B, K, M, D] (M: tokens x query heads per kv head), key/value [B, S, K, D], mask [B, S] or,
    per token, [B, T, S] -> [B, K, M, D] float32. The softmax is normalised after the product with the
    values, on [M, D] rather than on the [M, S] probabilities."""
    logits = jnp.einsum("bkmd,bskd->bkms", query, key, preferred_element_type=jnp.float32)
    if mask is not None:
        mask = mask.astype(bool)
        if mask.ndim == 3:  # each token's row, for each query head sharing the kv head (rows t * groups + g)
            mask = jnp.repeat(mask, query.shape[2] // mask.shape[1], axis=1)[:, None]
        else:
            mask = mask[:, None, None, :]
        # The most negative finite float: a fully masked row stays finite (uniform), never NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # softmax(scale * logits) without scaling the logits apart: exp(scale * (logits - max)), scale > 0.
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp((logits - peak) * scale)
    out = jnp.einsum("bkms,bskd->bkmd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    return out / jnp.sum(weights, axis=-1, keepdims=True)


def _cudnn_attention(query, key, value, scale, kv_mask, mesh):
    del mesh  # XLA partitions cuDNN's custom call itself
    lengths = None if kv_mask is None else jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def _splash_attention(query, key, value, scale, kv_mask, mesh):
    """Pallas splash attention: query [B, T, heads, D], key/value [B, S, kv_heads, D] -> [B, T, heads, D].

    XLA's partitioner cannot split a Pallas kernel: under a mesh it would gather every operand onto
    every device. So under a mesh (given, else the ambient one: `jax.set_mesh`) each device runs the
    kernel on its own examples and heads, through `jax.shard_map` (`sharding.attention_partition`).
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    interpret = target_platform(mesh) != "tpu"
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return _splash_local(query, key, value, scale, kv_mask, interpret)
    rows, masks = attention_partition(
        dict(zip(mesh.axis_names, mesh.axis_sizes)), query.shape[0], query.shape[2], key.shape[2]
    )
    return jax.shard_map(
        lambda q, k, v, m: _splash_local(q, k, v, scale, m, interpret),
        mesh=mesh,
        in_specs=(rows, rows, rows, masks),
        out_specs=rows,
        check_vma=False,
    )(query, key, value, kv_mask)


def _splash_local(query, key, value, scale, kv_mask, interpret: bool):
    """Splash attention on one device's arrays; `interpret` runs Pallas' interpreter instead of Mosaic.

    The kernel tiles sequences in blocks of 128-multiples and features in 128 lanes, so both are
    zero-padded: padded features add nothing to q.k and give zero outputs (sliced off), padded keys
    are masked through segment ids (queries: segment 1; keys: 1 if attended, 0 if not).
    """
    batch, length, heads, head_dim = query.shape
    kv_length = key.shape[1]
    q_block, q_padded = _splash_tiling(length)
    kv_block, kv_padded = _splash_tiling(kv_length)
    features = -(-head_dim // SPLASH_LANES) * SPLASH_LANES

    def heads_major(x, padded_length):  # [B, L, H, D] -> [B, H, L', D'], the kernel's layout
        x = jnp.pad(x, ((0, 0), (0, padded_length - x.shape[1]), (0, 0), (0, features - head_dim)))
        return x.transpose(0, 2, 1, 3)

    # The kernel takes no scale: it goes on the query, in float32 before the cast back.
    q = heads_major((query.astype(jnp.float32) * scale).astype(query.dtype), q_padded)
    k, v = heads_major(key, kv_padded), heads_major(value, kv_padded)
    segments = None
    if kv_mask is not None or kv_padded != kv_length:
        keep = jnp.ones((batch, kv_length), jnp.int32) if kv_mask is None else kv_mask.astype(jnp.int32)
        segments = splash.SegmentIds(
            q=jnp.ones((batch, q_padded), jnp.int32), kv=jnp.pad(keep, ((0, 0), (0, kv_padded - kv_length)))
        )

    # Mosaic when the program is for TPUs, Pallas' interpreter elsewhere. (Not `lax.platform_dependent`:
    # under autodiff it would keep the residuals of both branches.)
    kernel = _splash_kernel(heads, q_padded, kv_padded, q_block, kv_block, interpret=interpret)
    out = jax.vmap(kernel)(q, k, v, segment_ids=segments)
    return out[:, :, :length, :head_dim].transpose(0, 2, 1, 3)


def _splash_tiling(length: int) -> tuple[int, int]:
    """(block, padded length) for a sequence: the largest block up to SPLASH_MAX_BLOCK that a
    128-multiple covers, and the length rounded up to whole blocks."""
    block = min(SPLASH_MAX_BLOCK, -(-length // SPLASH_LANES) * SPLASH_LANES)
    return block, -(-length // block) * block


def _splash_kernel(heads: int, q_length: int, kv_length: int, q_block: int, kv_block: int, interpret: bool):
    """A splash kernel over one example, all keys visible (padding is masked by segment ids); GQA
    reads kv head h // (heads / kv_heads) as ours does. Built at trace time: it holds arrays of the trace."""
    mask = splash.MultiHeadMask([splash.FullMask((q_length, kv_length))] * heads)
    blocks = splash.BlockSizes(
        block_q=q_block,
        block_kv=kv_block,
        block_kv_compute=kv_block,
        block_q_dkv=q_block,
        block_kv_dkv=kv_block,
        block_kv_dkv_compute=kv_block,
        block_q_dq=q_block,
        block_kv_dq=kv_block,
    )
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


FUSED_KERNELS = {"cudnn": _cudnn_attention, "splash": _splash_attention}


@dataclasses.dataclass(frozen=True)
class ContextDrop:
    """Lumina-Next's Context Drop: the self-attention keys and values of each window x window
    block of a rows x cols token grid merged into their mean (after RoPE), as Lumina-T2X's code does
    (`kv_merge`); the queries stay, so every token keeps its own output, computed from
    rows * cols / window^2 keys. Each merged key stands for the same number of tokens, so the
    softmax needs no correction for multiplicity. Caption attention is untouched.
    """

    rows: int
    cols: int
    window: int

    def __post_init__(self):
        if self.window < 1 or self.rows % self.window or self.cols % self.window:
            raise ValueError(
                f"the Context Drop window must be a positive divisor of both sides of the {self.rows}x{self.cols} "
                f"token grid, got {self.window}"
            )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """[B, rows * cols, ...] tokens in row-major order -> [B, rows * cols / window^2, ...] window means."""
        batch, _, *features = tokens.shape
        w = self.window
        grid = tokens.astype(jnp.float32).reshape(batch, self.rows // w, w, self.cols // w, w, *features)
        return grid.mean(axis=(2, 4)).reshape(batch, -1, *features).astype(tokens.dtype)

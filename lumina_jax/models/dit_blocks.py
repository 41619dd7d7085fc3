"""The parts Lumina's diffusion transformers (Next-DiT, Flag-DiT) share: patches, the timestep and caption
conditioning, the attention with its tanh-gated caption branch, the SwiGLU feed-forward, the inputs every
layer reads and the loop over the stacked layers."""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from lumina_jax.models.attention import Backend, ContextDrop, dual_attention
from lumina_jax.models.layers import Dtype, TransformerSizes, layer_norm, linear, logical_axes
from lumina_jax.models.rope import apply_rope, grid_positions

TIMESTEP_FEATURES = 256
# What training's backward pass keeps of each layer's forward pass (`NextDiT(remat=...)`), the rest
# being recomputed: "none" keeps everything (no rematerialisation), "full" only the layer's input,
# "attention_ffn" also the attention and feed-forward outputs, "dots" every matmul's output; "offload" is
# "full" with each layer's input kept in the host's pinned memory, not the chip's (copied out in the forward
# pass, back in the backward pass), the same numbers with the residual stream off the chip.
LAYER_INPUT = "layer_input"
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "attention_ffn": jax.checkpoint_policies.save_only_these_names("attention_out", "ffn_out"),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
Remat = Literal["none", "full", "offload", "attention_ffn", "dots"]


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p]; tokens row-major, features ordered (c, ph, pw)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def patchify_padded(
    images: list[jax.Array], patch: int, length: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Images [C, H_i, W_i] of different sizes -> patches [B, T, C*p*p], positions [B, T, 2] int32, mask [B, T],
    T the longest image's tokens or `length` (at least that).

    Shorter sequences are padded at the end; pad tokens sit at their image's last position, as in
    the original trainer. The model swaps their embeddings for the learned pad token. Numpy images
    give numpy arrays (a training batch assembled on the host), JAX arrays JAX arrays.
    """
    xp = images[0].__array_namespace__()
    patches = [patchify(image[None], patch)[0] for image in images]
    grids = [grid_positions(image.shape[1] // patch, image.shape[2] // patch) for image in images]
    length = max(length or 0, *(len(p) for p in patches))
    pad = [length - len(p) for p in patches]
    return (
        xp.stack([xp.pad(p, ((0, n), (0, 0))) for p, n in zip(patches, pad)]),
        xp.asarray(np.stack([np.concatenate([g, np.repeat(g[-1:], n, axis=0)]) for g, n in zip(grids, pad)]), np.int32),
        xp.stack([xp.arange(length) < len(p) for p in patches]),
    )


def unpatchify(tokens: jax.Array, height: int, width: int, patch: int) -> jax.Array:
    """[B, T, p*p*C] with features ordered (ph, pw, c) -> [B, C, H, W]."""
    b, _, features = tokens.shape
    c = features // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, patch, patch, c)
    return x.transpose(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def timestep_features(t: jax.Array, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of t [B] (not scaled by 1000): [cos | sin], float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def conditioning(
    time_layers: tuple[nnx.Linear, nnx.Linear],
    caption_layers: tuple[nnx.LayerNorm, nnx.Linear],
    timestep: jax.Array,
    caption: jax.Array,
    caption_mask: jax.Array,
) -> jax.Array:
    """Timestep embedding (through time_layers, a SiLU between) plus the masked mean of the caption, normed
    and projected (caption_layers): [B, cond_dim]."""
    (time_1, time_2), (pool_norm, project) = time_layers, caption_layers
    t = time_2(jax.nn.silu(time_1(timestep_features(timestep))))
    weights = caption_mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(caption.astype(jnp.float32) * weights, axis=1) / jnp.sum(weights, axis=1)
    return t + project(pool_norm(pooled))


def fused_dense(x: jax.Array, *layers: nnx.Linear) -> jax.Array:
    """x through bias-free linear layers that read the same input, as one matmul: x [W_1 | W_2 | ...].

    The parameters stay separate (checkpoints and sharding rules name them); the kernels are joined
    at call time, one copy of the layer's weights, cheap beside the matmul it makes wider. Their
    adapters (`models.lora`) add their outputs, each to its own layer's columns.
    """
    dtype = layers[0].dtype
    kernel = jnp.concatenate([layer.kernel[...].astype(dtype) for layer in layers], axis=-1)
    y = jnp.dot(x.astype(dtype), kernel)
    start = 0
    for layer in layers:
        if layer.adapter is not None:
            y = y.at[..., start : start + layer.out_features].add(layer.adapter(x).astype(y.dtype))
        start += layer.out_features
    return y


@struct.dataclass
class BlockInputs:
    """What every layer reads besides the residual stream and its own caption keys and values; a
    pytree (arrays are leaves), so it passes through `jax.checkpoint` and the layer scan whole."""

    cond: jax.Array  # [B, cond_dim]: timestep plus pooled caption, float32
    caption: jax.Array  # [B, L, cross_attention_dim] in the compute dtype
    caption_mask: jax.Array  # [B, L] bool: caption tokens to attend to; or [B, T, L], per image token (regions)
    token_mask: jax.Array | None  # [B, T] bool: real image tokens (None: all are)
    cos: jax.Array  # RoPE tables [B or 1, T, head_dim / 2]
    sin: jax.Array
    self_scale: float = struct.field(pytree_node=False)  # self-attention's softmax scale (proportional)
    context_drop: ContextDrop | None = struct.field(pytree_node=False, default=None)


class Attention(nnx.Module):
    """Self-attention over image tokens plus tanh-gated cross-attention to the caption.

    One normed, rotated query serves both branches (the caption branch has its own with
    `separate_caption_query`); caption keys carry no RoPE.
    """

    def __init__(
        self,
        cfg: TransformerSizes,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        backend: Backend | None,
        rngs,
        separate_caption_query: bool = False,
    ):
        d, heads, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=1e-5, affine=True, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        self.backend = backend
        self.to_q = linear(d, heads, ("embed", "heads"), **dense)
        self.to_k = linear(d, kv, ("embed", "kv_heads"), **dense)
        self.to_v = linear(d, kv, ("embed", "kv_heads"), **dense)
        self.to_k_caption = linear(cfg.cross_attention_dim, kv, ("caption_embed", "kv_heads"), **dense)
        self.to_v_caption = linear(cfg.cross_attention_dim, kv, ("caption_embed", "kv_heads"), **dense)
        self.to_out = linear(heads, d, ("heads", "embed"), **dense)
        self.q_norm = layer_norm(heads, "heads", **norm) if cfg.qk_norm else None
        self.k_norm = layer_norm(kv, "kv_heads", **norm) if cfg.qk_norm else None
        self.k_caption_norm = layer_norm(kv, "kv_heads", **norm) if cfg.qk_norm else None
        separate = separate_caption_query
        self.to_q_caption = linear(d, heads, ("embed", "heads"), **dense) if separate else None
        self.q_caption_norm = layer_norm(heads, "heads", **norm) if separate and cfg.qk_norm else None
        # Zero-initialised as in the original: training starts with the caption branch closed.
        self.gate = nnx.Param(jnp.zeros((cfg.num_attention_heads,), param_dtype), **logical_axes("q_heads"))

    def _heads(self, x: jax.Array, norm: nnx.LayerNorm | None, num_heads: int, dtype) -> jax.Array:
        if norm is not None:
            x = norm(x)
        return x.reshape(*x.shape[:2], num_heads, self.head_dim).astype(dtype)

    def caption_keys_values(self, caption: jax.Array) -> jax.Array:
        """Keys and values of the (normed) caption, [2, B, L, kv_heads, head_dim] in the compute dtype."""
        dtype = self.to_q.dtype
        ck, cv = jnp.split(fused_dense(caption, self.to_k_caption, self.to_v_caption), 2, axis=-1)
        return jnp.stack(
            [
                self._heads(ck, self.k_caption_norm, self.num_kv_heads, dtype),
                self._heads(cv, None, self.num_kv_heads, dtype),
            ]
        )

    def __call__(self, x: jax.Array, caption_kv: jax.Array, inputs: BlockInputs) -> jax.Array:
        dtype, cos, sin = self.to_q.dtype, inputs.cos, inputs.sin
        heads, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        caption_query = [self.to_q_caption] if self.to_q_caption else []
        splits = [heads, heads + kv, heads + 2 * kv][: 2 + len(caption_query)]
        q, k, v, *caption_q = jnp.split(fused_dense(x, self.to_q, self.to_k, self.to_v, *caption_query), splits, -1)
        q = apply_rope(self._heads(q, self.q_norm, self.num_heads, jnp.float32), cos, sin).astype(dtype)
        if caption_q:
            caption_q = self._heads(caption_q[0], self.q_caption_norm, self.num_heads, jnp.float32)
            caption_q = [apply_rope(caption_q, cos, sin).astype(dtype)]
        k = apply_rope(self._heads(k, self.k_norm, self.num_kv_heads, jnp.float32), cos, sin)
        v = self._heads(v, None, self.num_kv_heads, dtype)
        if inputs.context_drop is not None:
            k, v = inputs.context_drop(k), inputs.context_drop(v)
        mixed = dual_attention(
            q,
            k.astype(dtype),
            v,
            caption_kv[0],
            caption_kv[1],
            scale=inputs.self_scale,
            caption_scale=self.head_dim**-0.5,
            caption_gate=jnp.tanh(self.gate[...].astype(jnp.float32)),
            caption_query=caption_q[0] if caption_q else None,
            kv_mask=inputs.token_mask,
            caption_mask=inputs.caption_mask,
            backend=self.backend,
        )
        return self.to_out(mixed.reshape(*x.shape[:2], -1))


class FeedForward(nnx.Module):
    """SwiGLU: down(silu(gate x) * up x), no biases."""

    def __init__(self, cfg: TransformerSizes, *, dtype: Dtype, param_dtype: Dtype, rngs):
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = linear(cfg.hidden_size, cfg.ffn_dim, ("embed", "mlp"), **dense)
        self.up = linear(cfg.hidden_size, cfg.ffn_dim, ("embed", "mlp"), **dense)
        self.down = linear(cfg.ffn_dim, cfg.hidden_size, ("mlp", "embed"), **dense)

    def __call__(self, x):
        gate, up = jnp.split(fused_dense(x, self.gate, self.up), 2, axis=-1)
        return self.down(jax.nn.silu(gate) * up)


def check_conditioning(cfg, batch: int, timestep, caption, caption_mask, caption_kv) -> None:
    """The timestep, caption, its mask and precomputed keys and values agree with a batch of `batch` and the
    config (a Next-DiT's or Flag-DiT's)."""
    if caption.ndim != 3 or caption.shape[-1] != cfg.cross_attention_dim:
        raise ValueError(
            f"encoder_hidden_states must be [batch, length, {cfg.cross_attention_dim}], got {caption.shape}"
        )
    for name, array in (("timestep", timestep), ("encoder_hidden_states", caption), ("encoder_mask", caption_mask)):
        if array.shape[0] != batch:
            raise ValueError(f"{name} has batch size {array.shape[0]}, hidden_states has {batch}")
    if caption_mask.shape != caption.shape[:2]:
        raise ValueError(f"encoder_mask shape {caption_mask.shape} does not match the caption {caption.shape[:2]}")
    kv_shape = (cfg.num_layers, 2, *caption.shape[:2], cfg.kv_heads, cfg.head_dim)
    if caption_kv is not None and caption_kv.shape != kv_shape:
        raise ValueError(
            f"caption_kv has shape {caption_kv.shape}; caption_keys_values of this caption gives {kv_shape}"
        )


def self_attention_scale(head_dim: int, num_tokens: int, base_sequence_length: int | None) -> float:
    """1 / sqrt(head_dim), times sqrt(log_base(tokens)) with proportional attention (a base_sequence_length)."""
    scale = head_dim**-0.5
    if base_sequence_length is not None:
        scale *= math.sqrt(math.log(num_tokens) / math.log(base_sequence_length))
    return scale


def caption_branch_forward_flops(cfg: TransformerSizes, image_tokens: int, caption_tokens: int) -> float:
    """One sample's forward matmul FLOPs (2 a multiply-add) through a transformer of these blocks: every layer's
    image tokens attend to themselves and to the caption's keys and values (`Attention`), none refine the
    caption. The config says how many hidden_size-wide modulations a block and the final layer take
    (`block_modulations`, `final_modulations`) and how many queries an image token projects."""
    d, cond, t, caption = cfg.hidden_size, cfg.cond_dim, image_tokens, caption_tokens
    heads, kv = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    per_layer = (
        cond * cfg.block_modulations * d  # the modulation, once a sample
        + t * d * (cfg.query_projections * heads + 2 * kv)  # queries, keys and values of the image tokens
        + caption * cfg.cross_attention_dim * 2 * kv  # keys and values of the caption
        + 2 * t * (t + caption) * heads  # scores and mixing: every query against image and caption keys
        + t * heads * d  # the output projection
        + 3 * t * d * cfg.ffn_dim  # SwiGLU
    )
    patch = cfg.patch_size**2
    outside = (
        t * patch * cfg.in_channels * d  # the patch embedding
        + (TIMESTEP_FEATURES + cond + cfg.cross_attention_dim) * cond  # timestep and caption conditioning
        + cond * cfg.final_modulations * d  # the final modulation
        + t * d * patch * cfg.out_channels  # the final linear layer
    )
    return 2 * (cfg.num_layers * per_layer + outside)


def layers_caption_keys_values(layers: nnx.Module, caption: jax.Array) -> jax.Array:
    """Each of the stacked layers' `caption_keys_values(caption)`: [layers, 2, B, L, kv_heads, head_dim]."""
    graphdef, stacked = nnx.split(layers)
    return jax.vmap(lambda params: nnx.merge(graphdef, params).caption_keys_values(caption))(stacked)


def run_layers(
    layers: nnx.Module,
    x: jax.Array,
    caption_kv: jax.Array | None,
    inputs: BlockInputs,
    *,
    remat: Remat,
    scan_layers: bool,
) -> jax.Array:
    """The residual stream through the stacked layers (each called as `layer(x, caption_kv, inputs)`): scanned,
    or unrolled; rematerialised by the `remat` policy."""
    graphdef, stacked = nnx.split(layers)

    def block(x, layer):
        params, layer_caption_kv = layer
        x = checkpoint_name(x, LAYER_INPUT)  # what the "offload" policy moves to the host
        return nnx.merge(graphdef, params)(x, layer_caption_kv, inputs), None

    if remat != "none":
        block = jax.checkpoint(block, prevent_cse=not scan_layers, policy=REMAT_POLICIES[remat])
    if scan_layers:
        return jax.lax.scan(block, x, (stacked, caption_kv))[0]
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
        x, _ = block(x, jax.tree.map(lambda a: a[i], (stacked, caption_kv)))
    return x

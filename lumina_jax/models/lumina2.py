"""Unified Next-DiT, the Lumina-Image 2.0 diffusion transformer, in Flax NNX.

Computes what diffusers' `Lumina2Transformer2DModel` computes, with the same array layouts at the boundary:
hidden_states [B, C, H, W], timestep [B] in [0, 1] (0 = noise, 1 = data), caption features [B, L, D] with
mask [B, L]; output [B, out_channels, H, W]. Caption tokens, embedded (RMSNorm, Linear), pass the context
refiner (blocks without adaLN); image patches, embedded, pass the noise refiner (blocks with adaLN); then
both run as one sequence, caption first, through the joint blocks under full self-attention, and the final
layer reads the image tokens. Attention is grouped-query, with an RMSNorm over each head's queries and keys
and a 3D RoPE over (caption index, row, column) whose axes follow each other (`rope.axis_rope`).

What diffusers does, and we reproduce:
- A patch's features are ordered (ph, pw, c), not Lumina-Next's (c, ph, pw); we take patches in the
  project's order (`patchify`) and reorder them before the embedding.
- A caption of n real tokens (its mask right-padded, valid tokens first, as tokenizers give it) is cut to
  those n, and the image tokens follow at once: the joint sequence is [caption_n, image, padding], every
  image token at caption index n (rows and columns from 0), in the noise refiner too (where a shared
  rotation of queries and keys changes nothing). The joint attention masks the padding only when lengths
  differ in the batch; a masked key changes no number, so we always mask. We keep the caption's padded
  tokens in the joint sequence, after the image's, and mask them: the same numbers, static shapes.
- Padded caption tokens get zero RoPE in the context refiner; they are masked keys and their outputs are
  dropped, so any values do.
- No proportional attention and no RoPE scaling: the softmax scale is 1/sqrt(head_dim) at every size,
  and positions past the tables (axes_lens: 300 caption indices, 512 rows and columns) fail.
- The timestep is not scaled by 1000; only the timestep modulates (the caption is not pooled into the
  conditioning); the FFN is 4 x hidden_size wide (then multiplier and multiple_of), not 8/3 x.
- The RoPE tables are computed in float64; the query/key norms' epsilon is 1e-5 whatever norm_eps says
  (the original code's is 1e-6: `qk_norm_eps`, which its checkpoints are read with).
- A batch holds one image size. The original code also takes images of several sizes, their tokens padded
  with zero patches that the noise refiner masks: `forward_sequence` does that.
"""

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from lumina_jax.models.attention import Backend, dot_product_attention
from lumina_jax.models.dit_blocks import (
    REMAT_POLICIES,
    TIMESTEP_FEATURES,
    FeedForward,
    Remat,
    fused_dense,
    patchify,
    patchify_padded,
    run_layers,
    timestep_features,
    unpatchify,
)
from lumina_jax.models.layers import (
    DIFFUSERS_BOOKKEEPING,
    Dtype,
    TransformerSizes,
    config_from_dict,
    float32_products,
    layer_norm,
    linear,
    rms_norm,
)
from lumina_jax.models.rope import apply_rope, axis_rope, axis_rope_tables, grid_positions

DIFFUSERS_QK_NORM_EPS = 1e-5  # diffusers' query/key norms' epsilon, whatever norm_eps says
ORIGINAL_QK_NORM_EPS = 1e-6  # the original code's (its RMSNorm's default; 1e-5 with apex, which it does not install)
rope_tables = functools.cache(axis_rope_tables)


# How the original Lumina-Image 2.0 repository samples (scripts/sample.sh, its demo's defaults): a grid of 18
# points (17 midpoint steps) time-shifted by 6, guidance 4 on every channel, capped at the conditional velocity's
# norm. As keywords of LuminaPipeline.__call__: pipe(prompt, **ORIGINAL_SAMPLING).
ORIGINAL_SAMPLING = dict(
    schedule="shifted", shift=6.0, solver="midpoint", num_inference_steps=17, guidance_scale=4.0, renorm_cfg=1.0
)


@dataclasses.dataclass(frozen=True)
class UnifiedNextDiTConfig(TransformerSizes):
    """Architecture, with the field names and defaults of diffusers' `Lumina2Transformer2DModel` config.json
    (the released 2B: these defaults with cap_feat_dim 2304, Gemma-2-2B's width)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None  # None: in_channels
    hidden_size: int = 2304
    num_layers: int = 26
    num_refiner_layers: int = 2
    num_attention_heads: int = 24
    num_kv_heads: int = 8
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    scaling_factor: float = 1.0
    axes_dim_rope: tuple[int, ...] = (32, 32, 32)
    axes_lens: tuple[int, ...] = (300, 512, 512)
    cap_feat_dim: int = 1024
    # Ours alone (config.json holds it only where it differs): the original code's checkpoints read with its
    # query/key norms' epsilon, diffusers' with theirs.
    qk_norm_eps: float = DIFFUSERS_QK_NORM_EPS

    family_name: ClassVar[str] = "Unified Next-DiT"  # the family's answers to `models.family.TransformerConfig`
    release: ClassVar[str] = "Lumina-Image 2.0"
    pipeline_class: ClassVar[str] = "Lumina2Pipeline"
    takes_regions: ClassVar[bool] = False
    takes_context_drop: ClassVar[bool] = False

    def __post_init__(self):
        # config.json gives lists; a config is hashable (a static argument of compiled functions)
        object.__setattr__(self, "axes_dim_rope", tuple(self.axes_dim_rope))
        object.__setattr__(self, "axes_lens", tuple(self.axes_lens))
        object.__setattr__(self, "out_channels", self.out_channels or self.in_channels)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_kv_heads {self.kv_heads}"
            )
        if len(self.axes_dim_rope) != 3 or len(self.axes_lens) != 3:
            raise ValueError(
                f"axes_dim_rope and axes_lens need 3 entries each, got {self.axes_dim_rope}, {self.axes_lens}"
            )
        if sum(self.axes_dim_rope) != self.head_dim or any(d % 2 for d in self.axes_dim_rope):
            raise ValueError(f"axes_dim_rope {self.axes_dim_rope} must be even and sum to head_dim {self.head_dim}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "UnifiedNextDiTConfig":
        return config_from_dict(cls, values, DIFFUSERS_BOOKKEEPING, cls.family_name)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values |= {"axes_dim_rope": list(self.axes_dim_rope), "axes_lens": list(self.axes_lens)}
        if self.qk_norm_eps == DIFFUSERS_QK_NORM_EPS:
            del values["qk_norm_eps"]
        return {"_class_name": "Lumina2Transformer2DModel", **values}

    @property
    def cross_attention_dim(self) -> int:
        """The caption features' width, under the other families' name."""
        return self.cap_feat_dim

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU width: 4 x hidden_size, times ffn_dim_multiplier, rounded up to multiple_of."""
        inner = 4 * self.hidden_size
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * -(-inner // self.multiple_of)

    @property
    def base_sequence_length(self) -> None:
        """None: the family has no proportional attention."""
        return None

    def sampler_defaults(self) -> dict[str, Any]:
        """As diffusers' Lumina2Pipeline samples: its flow-match scheduler over sigmas linspace(1, 1/N, N)
        (`sampling.lumina2_schedule`), guidance on every channel, renormalised (cfg_normalization). The
        family has no RoPE scaling, so the watershed changes nothing."""
        return dict(schedule="lumina2", scaling_watershed=1.0, cfg_all_channels=True, cfg_normalization=True)

    def sequence_length(self, rows: int, cols: int) -> int:
        """Image tokens (the caption's come on top, as many as its real tokens)."""
        return rows * cols

    def forward_flops(self, image_tokens: int, caption_tokens: int) -> float:
        """The context refiner over the caption, the noise refiner over the image, the joint layers over both;
        each block projects its tokens' queries, keys and values (grouped) and its output, attends over its
        sequence and runs SwiGLU, the modulated ones also their adaLN once a sample."""
        d, cond, t, caption = self.hidden_size, self.cond_dim, image_tokens, caption_tokens
        heads, kv = self.num_attention_heads * self.head_dim, self.kv_heads * self.head_dim

        def block(tokens: int, modulated: bool) -> int:
            return (
                modulated * cond * 4 * d  # scale and gate of attention and FFN
                + tokens * d * (heads + 2 * kv)  # queries, keys and values
                + 2 * tokens * tokens * heads  # scores and mixing
                + tokens * heads * d  # the output projection
                + 3 * tokens * d * self.ffn_dim  # SwiGLU
            )

        layers = self.num_refiner_layers * (block(caption, False) + block(t, True)) + self.num_layers * block(
            caption + t, True
        )
        patch = self.patch_size**2
        outside = (
            t * patch * self.in_channels * d  # the patch embedding
            + caption * self.cap_feat_dim * d  # the caption's projection
            + (TIMESTEP_FEATURES + cond) * cond  # the timestep embedding
            + cond * d  # the final modulation (scale)
            + t * d * patch * self.out_channels  # the final linear layer
        )
        return 2 * (layers + outside)

    def token_sequence(
        self, latents: list[jax.Array], length: int | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, None]:
        """`patchify_padded`'s patches, grid positions and real tokens; no end-of-line slots."""
        return *patchify_padded(latents, self.patch_size, length), None

    def resolution_scale(self, height: int, width: int) -> float:
        """Always 1: Lumina-Image 2.0 does not scale its RoPE with the resolution."""
        return 1.0

    def check_size(self, height: int, width: int, unit: int, context_drop: int = 1) -> None:
        """Whole tokens, within the RoPE tables' rows and columns; no Context Drop."""
        rows, cols = self.axes_lens[1:]
        if height % unit or width % unit or not (unit <= height <= rows * unit and unit <= width <= cols * unit):
            raise ValueError(
                f"height must be a multiple of {unit} between {unit} and {rows * unit} px and width one between "
                f"{unit} and {cols * unit} px, got {height}x{width}"
            )
        if context_drop != 1:
            raise ValueError(f"{self.family_name} has no Context Drop; got context_drop={context_drop}")


# The released 2B model of Lumina-Image 2.0, named as the original code names it.
PRESETS = {"NextDiT_2B_GQA_patch2_Adaln_Refiner": UnifiedNextDiTConfig(cap_feat_dim=2304)}


@struct.dataclass
class JointInputs:
    """What every block reads besides the residual stream: a pytree, through `jax.checkpoint` and the scan."""

    cond: jax.Array | None  # [B, cond_dim] timestep embedding, float32; None in the context refiner
    mask: jax.Array | None  # [B, S] bool: the keys to attend to (right-padded); None: all
    cos: jax.Array  # RoPE tables [B or 1, S, head_dim / 2]
    sin: jax.Array


class JointAttention(nnx.Module):
    """Grouped-query self-attention; queries and keys RMS-normed per head, then rotated."""

    def __init__(self, cfg: UnifiedNextDiTConfig, *, dtype: Dtype, param_dtype: Dtype, backend: Backend | None, rngs):
        d, heads, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.qk_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        self.backend = backend
        self.to_q = linear(d, heads, ("embed", "heads"), **dense)
        self.to_k = linear(d, kv, ("embed", "kv_heads"), **dense)
        self.to_v = linear(d, kv, ("embed", "kv_heads"), **dense)
        self.to_out = linear(heads, d, ("heads", "embed"), **dense)
        self.q_norm = rms_norm(cfg.head_dim, None, **norm)
        self.k_norm = rms_norm(cfg.head_dim, None, **norm)

    def __call__(self, x: jax.Array, inputs: JointInputs) -> jax.Array:
        dtype, (batch, length, _) = self.to_q.dtype, x.shape
        heads, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = jnp.split(fused_dense(x, self.to_q, self.to_k, self.to_v), [heads, heads + kv], -1)
        q = self.q_norm(q.reshape(batch, length, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(batch, length, self.num_kv_heads, self.head_dim))
        out = dot_product_attention(
            apply_rope(q, inputs.cos, inputs.sin).astype(dtype),
            apply_rope(k, inputs.cos, inputs.sin).astype(dtype),
            v.reshape(batch, length, self.num_kv_heads, self.head_dim).astype(dtype),
            scale=self.head_dim**-0.5,
            kv_mask=inputs.mask,
            backend=self.backend,
        )
        return self.to_out(out.reshape(batch, length, heads))


class JointBlock(nnx.Module):
    """Sandwich-normed attention and FFN; with adaLN (`modulated`) the inputs are scaled by (1 + scale) and
    the outputs gated by tanh(gate), else neither."""

    def __init__(
        self,
        cfg: UnifiedNextDiTConfig,
        *,
        modulated: bool,
        dtype: Dtype,
        param_dtype: Dtype,
        backend: Backend | None,
        rngs,
    ):
        norm = dict(eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.modulation = (
            linear(
                cfg.cond_dim,
                4 * cfg.hidden_size,
                ("cond", "embed"),
                use_bias=True,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nnx.initializers.zeros,
                rngs=rngs,
            )
            if modulated
            else None
        )
        self.attention_norm1 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.attention_norm2 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.ffn_norm1 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.ffn_norm2 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.attention = JointAttention(cfg, dtype=dtype, param_dtype=param_dtype, backend=backend, rngs=rngs)
        self.feed_forward = FeedForward(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, caption_kv: None, inputs: JointInputs) -> jax.Array:
        """caption_kv: always None (`dit_blocks.run_layers`' slot for a caption branch, which this family lacks)."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = 0.0, 1.0, 0.0, 1.0  # without adaLN: exact no-ops
        if self.modulation is not None:
            modulation = self.modulation(jax.nn.silu(inputs.cond)).astype(jnp.float32)[:, None, :]
            scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(modulation, 4, axis=-1)
            gate_msa, gate_mlp = jnp.tanh(gate_msa), jnp.tanh(gate_mlp)
        h = self.attention(self.attention_norm1(x) * (1 + scale_msa), inputs)
        x = x + gate_msa * self.attention_norm2(checkpoint_name(h, "attention_out"))
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp * self.ffn_norm2(checkpoint_name(h, "ffn_out"))


class UnifiedNextDiT(nnx.Module):
    """Unified Next-DiT. `dtype` is the compute dtype, `param_dtype` the storage dtype; with bfloat16
    compute, norms, RoPE, softmax statistics and the residual stream stay float32."""

    def __init__(
        self,
        config: UnifiedNextDiTConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        scan_layers: bool = True,
        remat: Remat = "none",
        attention_backend: Backend | None = None,
        rngs: nnx.Rngs,
    ):
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of none, {', '.join(REMAT_POLICIES)}")
        cfg = self.config = config
        self.dtype, self.scan_layers, self.remat = dtype, scan_layers, remat
        dense = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        zeros, small = nnx.initializers.zeros, nnx.initializers.normal(0.02)

        self.patch_embedder = linear(cfg.patch_size**2 * cfg.in_channels, cfg.hidden_size, ("patch", "embed"), **dense)
        self.time_linear_1 = linear(TIMESTEP_FEATURES, cfg.cond_dim, (None, "cond"), kernel_init=small, **dense)
        self.time_linear_2 = linear(cfg.cond_dim, cfg.cond_dim, ("cond", "cond"), kernel_init=small, **dense)
        self.caption_norm = rms_norm(
            cfg.cap_feat_dim, "caption_embed", eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.caption_proj = linear(
            cfg.cap_feat_dim, cfg.hidden_size, ("caption_embed", "embed"), kernel_init=small, **dense
        )

        def stacked_blocks(count: int, modulated: bool):
            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def blocks(rngs):
                return JointBlock(
                    cfg, modulated=modulated, dtype=dtype, param_dtype=param_dtype, backend=attention_backend, rngs=rngs
                )

            return blocks(rngs)

        self.context_refiner = stacked_blocks(cfg.num_refiner_layers, modulated=False)
        self.noise_refiner = stacked_blocks(cfg.num_refiner_layers, modulated=True)
        self.layers = stacked_blocks(cfg.num_layers, modulated=True)
        self.final_norm = layer_norm(cfg.hidden_size, None, eps=1e-6, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.final_modulation = linear(cfg.cond_dim, cfg.hidden_size, ("cond", "embed"), kernel_init=zeros, **dense)
        self.final_linear = linear(
            cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels, ("embed", "patch"), kernel_init=zeros, **dense
        )

    def _run(self, layers: nnx.Module, x: jax.Array, inputs: JointInputs) -> jax.Array:
        return run_layers(layers, x, None, inputs, remat=self.remat, scan_layers=self.scan_layers)

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_mask: jax.Array,
        *,
        rope: tuple[jax.Array, jax.Array] | None = None,
        caption_kv: jax.Array | None = None,
    ) -> jax.Array:
        """Velocity for latents [B, C, H, W]: [B, out_channels, H, W]. A sampler may pass `rope`, the tables
        of `image_rope`, and `caption_kv`, the refined caption of `caption_keys_values`: both stay the same
        at every step."""
        cfg, p = self.config, self.config.patch_size
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be [batch, {cfg.in_channels}, height, width], got {hidden_states.shape}"
            )
        _, _, height, width = hidden_states.shape
        if rope is None:
            rope = self.image_rope(height, width)
        out = self.forward_tokens(
            patchify(hidden_states, p), rope, None, timestep, encoder_hidden_states, encoder_mask, caption_kv=caption_kv
        )
        return unpatchify(out, height, width, p)

    def image_rope(
        self, height: int, width: int, *, linear_factor: float = 1.0, ntk_factor: float = 1.0
    ) -> tuple[jax.Array, jax.Array]:
        """The (row, column) part of the image tokens' RoPE for latents of height x width: cos and sin
        [1, tokens, (axes_dim_rope[1] + axes_dim_rope[2]) / 2]. No scaling: the factors must be 1."""
        cfg, p = self.config, self.config.patch_size
        if linear_factor != 1.0 or ntk_factor != 1.0:
            raise ValueError(
                f"{cfg.family_name} has no RoPE scaling; got linear_factor {linear_factor}, ntk {ntk_factor}"
            )
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p}")
        cfg.check_size(height, width, p)
        return self._grid_rope(jnp.asarray(grid_positions(height // p, width // p))[None])

    def _grid_rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return axis_rope(rope_tables(self.config.axes_dim_rope, self.config.axes_lens)[1:], positions)

    def forward_sequence(
        self,
        patches: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array | None,
        end_of_line: None,
        timestep: jax.Array,
        caption: jax.Array,
        caption_mask: jax.Array,
    ) -> jax.Array:
        """`forward_tokens` on `UnifiedNextDiTConfig.token_sequence`'s tokens, RoPE'd by their grid positions
        [B, T, 2] (no end-of-line slots: end_of_line is None)."""
        if end_of_line is not None:
            raise ValueError(f"{self.config.family_name}'s token sequence has no end-of-line slots; pass None")
        return self.forward_tokens(patches, self._grid_rope(positions), token_mask, timestep, caption, caption_mask)

    @float32_products
    def forward_tokens(
        self,
        patches: jax.Array,
        image_rope: tuple[jax.Array, jax.Array],
        token_mask: jax.Array | None,
        timestep: jax.Array,
        caption: jax.Array,
        caption_mask: jax.Array,
        *,
        caption_kv: jax.Array | None = None,
    ) -> jax.Array:
        """The transformer on patches [B, T, p*p*in_channels] (`patchify`'s feature order) with their rows'
        and columns' RoPE tables [B or 1, T, ...] (`image_rope`); token_mask [B, T] marks real tokens in a
        batch of images of different sizes (right-padded; None: all are real). caption_kv: the caption's
        `caption_keys_values`, else computed here. Returns [B, T, p*p*out_channels], features (ph, pw, c)."""
        cfg = self.config
        batch, tokens, features = patches.shape
        self._check_caption(batch, caption, caption_mask, caption_kv)
        caption_mask = caption_mask.astype(bool)
        caption_len = jnp.sum(caption_mask, axis=1, dtype=jnp.int32)  # [B]
        if caption_kv is None:
            caption_kv = self.caption_keys_values(caption, caption_mask)
        cond = self.time_linear_2(jax.nn.silu(self.time_linear_1(timestep_features(timestep)))).astype(jnp.float32)

        # Image tokens sit at caption index n (the caption's real tokens), then their row and column.
        tables = rope_tables(cfg.axes_dim_rope, cfg.axes_lens)
        index_rope = axis_rope(tables[:1], caption_len[:, None, None])  # [B, 1, axes_dim[0] / 2]
        expand = lambda table: jnp.broadcast_to(table, (batch, tokens, table.shape[-1]))  # noqa: E731
        image_cos, image_sin = (jnp.concatenate([expand(i), expand(g)], -1) for i, g in zip(index_rope, image_rope))
        # diffusers' patches read (ph, pw, c); ours (c, ph, pw)
        patches = patches.reshape(batch, tokens, cfg.in_channels, -1).swapaxes(-1, -2).reshape(batch, tokens, features)
        x = self.patch_embedder(patches).astype(jnp.float32)
        x = self._run(self.noise_refiner, x, JointInputs(cond, token_mask, image_cos, image_sin))

        # The joint sequence [caption_n, image, padded caption, as diffusers' but for the padding]: a
        # permutation of [caption, image] that keeps the keys to attend to first (fused kernels take lengths).
        length = caption.shape[1]
        j = jnp.arange(length + tokens)[None, :]
        n = caption_len[:, None]
        order = jnp.where(j < n, j, jnp.where(j < n + tokens, length + j - n, j - tokens))[..., None]
        caption_cos, caption_sin = self._caption_rope(length)

        def joint(caption_part, image_part):
            caption_part = jnp.broadcast_to(caption_part, (batch, *caption_part.shape[1:]))
            return jnp.take_along_axis(jnp.concatenate([caption_part, image_part], axis=1), order, axis=1)

        image_len = tokens if token_mask is None else jnp.sum(token_mask, axis=1, dtype=jnp.int32)[:, None]
        inputs = JointInputs(cond, j < n + image_len, joint(caption_cos, image_cos), joint(caption_sin, image_sin))
        x = self._run(self.layers, joint(caption_kv, x), inputs)

        x = jnp.take_along_axis(x, (n + jnp.arange(tokens))[..., None], axis=1)  # the image tokens
        scale = self.final_modulation(jax.nn.silu(cond)).astype(jnp.float32)[:, None, :]
        return self.final_linear(self.final_norm(x) * (1 + scale)).astype(jnp.float32)

    def _caption_rope(self, length: int) -> tuple[jax.Array, jax.Array]:
        """Caption token i at (i, 0, 0): cos and sin [1, length, head_dim / 2]."""
        cfg = self.config
        positions = jnp.zeros((1, length, 3), jnp.int32).at[..., 0].set(jnp.arange(length))
        return axis_rope(rope_tables(cfg.axes_dim_rope, cfg.axes_lens), positions)

    def _check_caption(self, batch: int, caption, caption_mask, caption_kv) -> None:
        cfg = self.config
        if caption.ndim != 3 or caption.shape[0] != batch or caption.shape[-1] != cfg.cap_feat_dim:
            raise ValueError(
                f"encoder_hidden_states must be [{batch}, length, {cfg.cap_feat_dim}], got {caption.shape}"
            )
        if caption_mask.shape != caption.shape[:2]:
            raise ValueError(f"encoder_mask shape {caption_mask.shape} does not match the caption {caption.shape[:2]}")
        if caption.shape[1] >= cfg.axes_lens[0]:
            raise ValueError(
                f"captions of {caption.shape[1]} tokens exceed the RoPE table's caption indices: at most "
                f"{cfg.axes_lens[0] - 1} (axes_lens[0] - 1)"
            )
        if caption_kv is not None and caption_kv.shape != (*caption.shape[:2], cfg.hidden_size):
            raise ValueError(
                f"caption_kv has shape {caption_kv.shape}; caption_keys_values of this caption gives "
                f"{(*caption.shape[:2], cfg.hidden_size)}"
            )

    @float32_products
    def caption_keys_values(self, caption: jax.Array, caption_mask: jax.Array) -> jax.Array:
        """The caption as the joint blocks read it, embedded and through the context refiner: [B, L, hidden_size],
        float32. It depends on the caption alone, so a sampler computes it once per image and passes it as
        `caption_kv` to every step. Unlike the other families' it needs the caption's mask [B, L]."""
        caption_mask = caption_mask.astype(bool)
        x = self.caption_proj(self.caption_norm(caption.astype(self.dtype))).astype(jnp.float32)
        cos, sin = self._caption_rope(caption.shape[1])
        return self._run(self.context_refiner, x, JointInputs(None, caption_mask, cos, sin))

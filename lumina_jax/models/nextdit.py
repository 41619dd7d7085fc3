"""Next-DiT, the Lumina-Next diffusion transformer, in Flax NNX.

Computes what diffusers' `LuminaNextDiT2DModel` and the original `NextDiT` compute, with the same
array layouts at the boundary: hidden_states [B, C, H, W], timestep [B] in [0, 1] (0 = noise,
1 = data), caption features [B, L, D] with mask [B, L]; output [B, out_channels, H, W].
Differences that change no numbers: the shared query is projected once (diffusers does it twice),
projections of the same input run as one matmul (q/k/v, caption k/v, FFN gate/up), layers are
stacked and scanned, and kv heads are never repeated in memory.
"""

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lumina_jax.models.attention import Backend, ContextDrop
from lumina_jax.models.dit_blocks import (
    REMAT_POLICIES,
    TIMESTEP_FEATURES,
    Attention,
    BlockInputs,
    FeedForward,
    Remat,
    caption_branch_forward_flops,
    check_conditioning,
    conditioning,
    layers_caption_keys_values,
    patchify,
    patchify_padded,
    run_layers,
    self_attention_scale,
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
    logical_axes,
    rms_norm,
)
from lumina_jax.models.rope import grid_positions, rope_frequencies

ROPE_MAX_GRID = 384  # the released RoPE table: 384 x 384 tokens, 6144 px per side at patch 2, VAE 8


@dataclasses.dataclass(frozen=True)
class NextDiTConfig(TransformerSizes):
    """Architecture, with the field names and defaults of diffusers' transformer config.json."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 2304
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    learn_sigma: bool = True
    qk_norm: bool = True
    cross_attention_dim: int = 2048
    scaling_factor: float = 1.0
    # The caption branch has its own query projection and norm (diffusers keeps two copies, attn1's
    # and attn2's, equal in the released weights; fine-tuning with diffusers may make them differ).
    separate_caption_query: bool = False

    family_name: ClassVar[str] = "Next-DiT"  # the family's answers to `models.family.TransformerConfig`
    release: ClassVar[str] = "Lumina-Next"
    pipeline_class: ClassVar[str] = "LuminaPipeline"
    takes_regions: ClassVar[bool] = True
    takes_context_drop: ClassVar[bool] = True
    block_modulations: ClassVar[int] = 4  # scale and gate of attention and FFN
    final_modulations: ClassVar[int] = 1  # scale

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_kv_heads {self.kv_heads}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NextDiTConfig":
        return config_from_dict(cls, values, DIFFUSERS_BOOKKEEPING, "Next-DiT")

    def to_dict(self) -> dict[str, Any]:
        """diffusers' config.json; separate_caption_query, ours alone, only where it is set."""
        values = dataclasses.asdict(self)
        if not self.separate_caption_query:
            del values["separate_caption_query"]
        return {"_class_name": "LuminaNextDiT2DModel", **values}

    @property
    def base_sequence_length(self) -> int:
        """Image tokens at the training resolution (sample_size latent pixels a side), the base of
        proportional attention: 4096 for the released model, diffusers' (1024 px // 16)^2; 16 for the
        digits model (32 px, patch 8, no VAE), where diffusers' formula assumes a VAE and gives 256."""
        return (self.sample_size // self.patch_size) ** 2

    @property
    def query_projections(self) -> int:
        return 2 if self.separate_caption_query else 1

    def sampler_defaults(self) -> dict[str, Any]:
        """As diffusers samples Lumina-Next: its flow-match schedule, RoPE scaled linearly until t = 1,
        NTK-scaled from there."""
        return dict(schedule="diffusers", scaling_watershed=1.0)

    def sequence_length(self, rows: int, cols: int) -> int:
        return rows * cols

    def forward_flops(self, image_tokens: int, caption_tokens: int) -> float:
        return caption_branch_forward_flops(self, image_tokens, caption_tokens)

    def token_sequence(
        self, latents: list[jax.Array], length: int | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, None]:
        """`patchify_padded`'s patches, grid positions and real tokens; no end-of-line slots."""
        return *patchify_padded(latents, self.patch_size, length), None

    def resolution_scale(self, height: int, width: int) -> float:
        """Lumina-Next's time-aware scaling: sqrt(area) relative to the training size."""
        return math.sqrt(height * width) / self.sample_size

    def check_size(self, height: int, width: int, unit: int, context_drop: int = 1) -> None:
        """Whole tokens, within the RoPE table's grid."""
        fits = unit <= height <= ROPE_MAX_GRID * unit and unit <= width <= ROPE_MAX_GRID * unit
        if height % unit or width % unit or not fits:
            raise ValueError(
                f"height and width must be multiples of {unit} between {unit} and {ROPE_MAX_GRID * unit} px, "
                f"got {height}x{width}"
            )


# The released 2B model (Lumina-Next-SFT and Lumina-Next-T2I), named as the original code names it.
PRESETS = {"NextDiT_2B_GQA_patch2": NextDiTConfig(num_layers=24, num_kv_heads=8)}


def check_grid(rows: int, cols: int, patch: int) -> None:
    if rows > ROPE_MAX_GRID or cols > ROPE_MAX_GRID:
        raise ValueError(
            f"a {rows}x{cols} token grid exceeds the RoPE table of {ROPE_MAX_GRID}x{ROPE_MAX_GRID} positions "
            f"(latents at most {ROPE_MAX_GRID * patch} per side)"
        )


class NextDiTBlock(nnx.Module):
    """Sandwich-normed attention and FFN, each scaled by (1 + scale) and gated by tanh(gate)."""

    def __init__(self, cfg: NextDiTConfig, *, dtype: Dtype, param_dtype: Dtype, backend: Backend | None, rngs):
        norm = dict(eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.modulation = linear(
            cfg.cond_dim,
            4 * cfg.hidden_size,
            ("cond", "embed"),
            use_bias=True,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.attention_norm1 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.attention_norm2 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.ffn_norm1 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.ffn_norm2 = rms_norm(cfg.hidden_size, "embed", **norm)
        self.caption_norm = rms_norm(cfg.cross_attention_dim, "caption_embed", **norm)
        self.attention = Attention(
            cfg,
            dtype=dtype,
            param_dtype=param_dtype,
            backend=backend,
            rngs=rngs,
            separate_caption_query=cfg.separate_caption_query,
        )
        self.feed_forward = FeedForward(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def caption_keys_values(self, caption: jax.Array) -> jax.Array:
        return self.attention.caption_keys_values(self.caption_norm(caption))

    def __call__(self, x: jax.Array, caption_kv: jax.Array | None, inputs: BlockInputs) -> jax.Array:
        """caption_kv: this layer's `caption_keys_values(caption)`, or None to compute it here."""
        modulation = self.modulation(jax.nn.silu(inputs.cond)).astype(jnp.float32)[:, None, :]
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(modulation, 4, axis=-1)
        h = self.attention(
            self.attention_norm1(x) * (1 + scale_msa),
            self.caption_keys_values(inputs.caption) if caption_kv is None else caption_kv,
            inputs,
        )
        x = x + jnp.tanh(gate_msa) * self.attention_norm2(checkpoint_name(h, "attention_out"))
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + jnp.tanh(gate_mlp) * self.ffn_norm2(checkpoint_name(h, "ffn_out"))


class NextDiT(nnx.Module):
    """Next-DiT. `dtype` is the compute dtype, `param_dtype` the storage dtype; with bfloat16
    compute, norms, RoPE, softmax statistics and the residual stream stay float32."""

    def __init__(
        self,
        config: NextDiTConfig,
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
        patch_features = cfg.patch_size**2 * cfg.in_channels

        self.patch_embedder = linear(patch_features, cfg.hidden_size, ("patch", "embed"), **dense)
        self.pad_token = nnx.Param(small(rngs.params(), (cfg.hidden_size,), param_dtype), **logical_axes("embed"))
        self.time_linear_1 = linear(TIMESTEP_FEATURES, cfg.cond_dim, (None, "cond"), kernel_init=small, **dense)
        self.time_linear_2 = linear(cfg.cond_dim, cfg.cond_dim, ("cond", "cond"), kernel_init=small, **dense)
        self.caption_pool_norm = layer_norm(
            cfg.cross_attention_dim, "caption_embed", eps=1e-5, affine=True, param_dtype=param_dtype, rngs=rngs
        )
        self.caption_proj = linear(
            cfg.cross_attention_dim, cfg.cond_dim, ("caption_embed", "cond"), kernel_init=zeros, **dense
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs):
            return NextDiTBlock(cfg, dtype=dtype, param_dtype=param_dtype, backend=attention_backend, rngs=rngs)

        self.layers = stacked_blocks(rngs)
        self.final_norm = layer_norm(cfg.hidden_size, None, eps=1e-6, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.final_modulation = linear(cfg.cond_dim, cfg.hidden_size, ("cond", "embed"), kernel_init=zeros, **dense)
        self.final_linear = linear(
            cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels, ("embed", "patch"), kernel_init=zeros, **dense
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_mask: jax.Array,
        *,
        linear_factor: float | jax.Array = 1.0,
        ntk_factor: float | jax.Array = 1.0,
        base_sequence_length: int | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        caption_kv: jax.Array | None = None,
        context_drop: int = 1,
        caption_regions: jax.Array | None = None,
    ) -> jax.Array:
        """Velocity (and learned sigma) for latents [B, C, H, W]: [B, out_channels, H, W].

        caption_regions [B, (H/p)(W/p), L] bool, for compositional generation (Lumina-Next's regional
        captions): the caption tokens each image token attends to, in place of encoder_mask, which then
        only says which tokens' mean conditions the model (a global caption's, say).

        base_sequence_length turns on proportional attention (diffusers passes
        `config.base_sequence_length`). The RoPE factors may be traced values; a sampler may instead
        pass `rope`, tables from `image_rope` computed once for all steps, and `caption_kv`, the
        caption's keys and values from `caption_keys_values`, which change only with the caption.

        context_drop > 1 turns on the paper's Context Drop, an approximation for speed at high
        resolution: self-attention reads the means of context_drop x context_drop blocks of image
        keys and values (`ContextDrop`). Lumina-T2X's code merges sqrt(tokens / base_sequence_length)
        rounded, which is 2 at 2048 px for the released model. 1 (the default) is exact.
        """
        cfg, p = self.config, self.config.patch_size
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be [batch, {cfg.in_channels}, height, width], got {hidden_states.shape}"
            )
        _, _, height, width = hidden_states.shape
        self._check_latent_size(height, width)
        if rope is None:
            rope = self.image_rope(height, width, linear_factor=linear_factor, ntk_factor=ntk_factor)
        out = self.forward_tokens(
            patchify(hidden_states, p),
            rope,
            None,
            timestep,
            encoder_hidden_states,
            encoder_mask,
            base_sequence_length=base_sequence_length,
            caption_kv=caption_kv,
            context_drop=ContextDrop(height // p, width // p, context_drop) if context_drop != 1 else None,
            caption_regions=caption_regions,
        )
        return unpatchify(out, height, width, p)

    def _check_latent_size(self, height: int, width: int) -> None:
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p}")
        check_grid(height // p, width // p, p)

    def image_rope(
        self, height: int, width: int, *, linear_factor: float | jax.Array = 1.0, ntk_factor: float | jax.Array = 1.0
    ) -> tuple[jax.Array, jax.Array]:
        """RoPE cos/sin tables [1, tokens, head_dim / 2] for latents of height x width."""
        self._check_latent_size(height, width)
        p = self.config.patch_size
        positions = jnp.asarray(grid_positions(height // p, width // p))[None]
        return rope_frequencies(positions, self.config.head_dim, linear_factor=linear_factor, ntk_factor=ntk_factor)

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
        """`forward_tokens` on `NextDiTConfig.token_sequence`'s tokens, RoPE'd by their grid positions [B, T, 2]
        (Next-DiT has no end-of-line slots: end_of_line is None). No proportional attention, as trained."""
        if end_of_line is not None:
            raise ValueError("Next-DiT's token sequence has no end-of-line slots; pass end_of_line=None")
        rope = rope_frequencies(positions, self.config.head_dim)
        return self.forward_tokens(patches, rope, token_mask, timestep, caption, caption_mask)

    @float32_products
    def forward_tokens(
        self,
        patches: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        token_mask: jax.Array | None,
        timestep: jax.Array,
        caption: jax.Array,
        caption_mask: jax.Array,
        *,
        base_sequence_length: int | None = None,
        caption_kv: jax.Array | None = None,
        context_drop: ContextDrop | None = None,
        caption_regions: jax.Array | None = None,
    ) -> jax.Array:
        """The transformer on patches [B, T, p*p*in_channels] (`patchify`'s feature order) with RoPE
        tables [B or 1, T, head_dim / 2] (`rope_frequencies` of the patches' grid positions);
        caption_regions [B, T, L] as `__call__` takes it.

        token_mask [B, T] marks real tokens in a batch of images of different sizes: the others
        become the learned pad token and are never attended to. context_drop merges the image keys
        and values of one token grid, so it takes no token_mask. Returns [B, T, p*p*out_channels].
        """
        cfg = self.config
        batch, num_tokens, _ = patches.shape
        check_conditioning(cfg, batch, timestep, caption, caption_mask, caption_kv)
        if caption_regions is not None and caption_regions.shape != (batch, num_tokens, caption.shape[1]):
            raise ValueError(
                f"caption_regions must be [batch, tokens, caption length] = {(batch, num_tokens, caption.shape[1])}, "
                f"got {caption_regions.shape}"
            )
        if context_drop is not None and (token_mask is not None or context_drop.rows * context_drop.cols != num_tokens):
            raise ValueError(
                f"Context Drop needs the {num_tokens} tokens of one {context_drop.rows}x{context_drop.cols} grid per "
                "image and no token_mask"
            )

        time_layers, caption_layers = (
            (self.time_linear_1, self.time_linear_2),
            (self.caption_pool_norm, self.caption_proj),
        )
        cond = conditioning(time_layers, caption_layers, timestep, caption, caption_mask)
        x = self.patch_embedder(patches).astype(jnp.float32)
        if token_mask is not None:
            x = jnp.where(token_mask[..., None], x, self.pad_token[...].astype(jnp.float32))
        inputs = BlockInputs(
            cond=cond,
            caption=caption.astype(self.dtype),
            caption_mask=(caption_mask if caption_regions is None else caption_regions).astype(bool),
            token_mask=token_mask,
            cos=rope[0],
            sin=rope[1],
            self_scale=self_attention_scale(cfg.head_dim, num_tokens, base_sequence_length),
            context_drop=context_drop,
        )
        x = run_layers(self.layers, x, caption_kv, inputs, remat=self.remat, scan_layers=self.scan_layers)

        scale = self.final_modulation(jax.nn.silu(cond)).astype(jnp.float32)[:, None, :]
        return self.final_linear(self.final_norm(x) * (1 + scale)).astype(jnp.float32)

    @float32_products
    def caption_keys_values(self, caption: jax.Array, caption_mask: jax.Array | None = None) -> jax.Array:
        """Every layer's keys and values of the caption [B, L, D]: [layers, 2, B, L, kv_heads, head_dim]
        (the mask is applied where they are attended to, so it is not needed here).

        They depend on the caption alone, so a sampler computes them once per image and passes them
        as `caption_kv` to every step (with the small config of benchmarks/speed.py, 8-9% of a step).
        """
        return layers_caption_keys_values(self.layers, caption.astype(self.dtype))

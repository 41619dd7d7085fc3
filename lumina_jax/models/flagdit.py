"""Flag-DiT, the Lumina-T2I diffusion transformer (the original code's `DiT_Llama`), in Flax NNX.

Computes what the original computes, with Next-DiT's array layouts at the boundary: hidden_states
[B, C, H, W], timestep [B] in [0, 1] (0 = noise, 1 = data), caption features [B, L, D] with mask [B, L];
output [B, out_channels, H, W] (the original returns the first in_channels of them).

Where it differs from Next-DiT:
- tokens: each row of patches is closed by a learned end-of-line token, and a batch of images of
  different sizes is padded at the end with the learned pad token (`flag_tokens`);
- RoPE is 1D, over the position in that sequence, end-of-line and pad tokens included;
- blocks are pre-norm only, modulated with shift and scale, and gated without tanh;
- the final layer shifts as well as scales.
The attention (one normed, rotated query for the image and the tanh-gated caption branch), the SwiGLU
feed-forward and the timestep and caption conditioning are Next-DiT's (`models.dit_blocks`).
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lumina_jax.models.attention import Backend
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
    run_layers,
    self_attention_scale,
)
from lumina_jax.models.layers import (
    Dtype,
    TransformerSizes,
    config_from_dict,
    float32_products,
    layer_norm,
    linear,
    logical_axes,
    rms_norm,
)
from lumina_jax.models.rope import rope_frequencies

ROPE_MAX_TOKENS = 40000  # the original's RoPE table


@dataclasses.dataclass(frozen=True)
class FlagDiTConfig(TransformerSizes):
    """Architecture, named as Next-DiT's config names it (the original: dim, n_layers, n_heads, n_kv_heads,
    cap_feat_dim); defaults as the original's `DiT_Llama`."""

    sample_size: int = 128  # latent pixels a side at the training resolution (1024 px with the SDXL VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    learn_sigma: bool = True
    qk_norm: bool = False
    cross_attention_dim: int = 5120
    # The RoPE the model was trained with (the trainer's --rope_scaling_factor and --ntk_factor).
    rope_scaling_factor: float = 1.0
    ntk_factor: float = 1.0

    family_name: ClassVar[str] = "Flag-DiT"  # the family's answers to `models.family.TransformerConfig`
    release: ClassVar[str] = "Lumina-T2I"
    pipeline_class: ClassVar[str] = "LuminaT2IPipeline"
    takes_regions: ClassVar[bool] = False
    takes_context_drop: ClassVar[bool] = False
    block_modulations: ClassVar[int] = 6  # shift, scale and gate of attention and FFN
    final_modulations: ClassVar[int] = 2  # shift and scale
    query_projections: ClassVar[int] = 1  # one query for the image and the caption branch

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into num_attention_heads {self.num_attention_heads} "
                "heads of an even size (1D RoPE turns pairs)"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_kv_heads {self.kv_heads}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlagDiTConfig":
        return config_from_dict(cls, values, ("_class_name",), "Flag-DiT")

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "FlagDiT", **dataclasses.asdict(self)}

    @property
    def base_sequence_length(self) -> int:
        """Tokens at the training resolution, end-of-line tokens included: the original demo's base of
        proportional attention, (image_size // 16)^2 + (image_size // 16) * 2 for patch 2 and the SDXL VAE."""
        side = self.sample_size // self.patch_size
        return side * (side + 1) + side  # the demo counts two end-of-line tokens a row

    def sampler_defaults(self) -> dict[str, Any]:
        """As Lumina-T2I's demo samples: the time-shifted uniform grid, NTK-scaled RoPE at every step."""
        return dict(schedule="shifted", scaling_watershed=0.0)

    def sequence_length(self, rows: int, cols: int) -> int:
        return rows * (cols + 1)  # rows of tokens, each closed by an end-of-line token

    def forward_flops(self, image_tokens: int, caption_tokens: int) -> float:
        return caption_branch_forward_flops(self, image_tokens, caption_tokens)

    def token_sequence(
        self, latents: list[jax.Array], length: int | None = None
    ) -> tuple[jax.Array, None, jax.Array, jax.Array]:
        """`flag_tokens`' sequence: patches, no grid positions (RoPE is by index), real tokens, end-of-line slots."""
        patches, end_of_line, real = flag_tokens(latents, self.patch_size, length)
        xp = latents[0].__array_namespace__()
        return patches, None, xp.ones(end_of_line.shape, bool) if real is None else real, end_of_line

    def resolution_scale(self, height: int, width: int) -> float:
        """Lumina-T2I's demo's, which it applies as the NTK factor at every step: the ratio of image tokens."""
        p, side = self.patch_size, self.sample_size // self.patch_size
        return (height // p) * (width // p) / side**2

    def check_size(self, height: int, width: int, unit: int, context_drop: int = 1) -> None:
        """Whole tokens, at most the RoPE table's positions, end-of-line tokens included; no Context Drop."""
        fits = self.sequence_length(height // unit, width // unit) <= ROPE_MAX_TOKENS
        if height % unit or width % unit or height < unit or width < unit or not fits:
            raise ValueError(
                f"height and width must be multiples of {unit} from {unit} px, with (height / {unit}) x "
                f"(width / {unit} + 1) at most {ROPE_MAX_TOKENS} tokens, got {height}x{width}"
            )
        if context_drop != 1:
            raise ValueError(f"context_drop={context_drop}: Context Drop is Next-DiT's; Flag-DiT takes 1")


# The released Lumina-T2I (Flag-DiT 5B with LLaMA-2-7B captions), named as the original code names it.
PRESETS = {
    "DiT_Llama_5B_patch2": FlagDiTConfig(
        hidden_size=3072,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=32,
        qk_norm=True,
        cross_attention_dim=4096,
    )
}


def flag_tokens(
    images: list[jax.Array] | jax.Array, patch: int, length: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Images [C, H_i, W_i] (or a batch [B, C, H, W]) as Flag-DiT's token sequence: each row of patches
    then an end-of-line slot, and pad slots up to the longest sequence (or `length`). Returns patches [B, T, C*p*p]
    (zero in the end-of-line and pad slots), which slots are end-of-line [B, T] bool, and the real
    tokens [B, T] bool (None when no image is padded). Numpy images give numpy arrays (a training batch
    assembled on the host), JAX arrays JAX arrays."""
    xp = images[0].__array_namespace__()
    lengths, rows = [], []
    for image in images:
        _, height, width = image.shape
        grid = patchify(image[None], patch)[0].reshape(height // patch, width // patch, -1)
        rows.append(xp.pad(grid, ((0, 0), (0, 1), (0, 0))).reshape(-1, grid.shape[-1]))
        lengths.append((height // patch, width // patch + 1))
    length = max(length or 0, *(r * c for r, c in lengths))
    patches = xp.stack([xp.pad(x, ((0, length - len(x)), (0, 0))) for x in rows])
    eol = np.zeros((len(rows), length), bool)
    for i, (r, c) in enumerate(lengths):
        eol[i, c - 1 : r * c : c] = True
    real = np.arange(length)[None] < np.array([[r * c for r, c in lengths]]).T
    return patches, xp.asarray(eol), None if real.all() else xp.asarray(real)


def unflag_tokens(tokens: jax.Array, height: int, width: int, patch: int) -> jax.Array:
    """[B, T, p*p*C] with features ordered (ph, pw, c) -> [B, C, H, W] of a height x width image's
    tokens at the start of each sequence, end-of-line tokens dropped."""
    b, _, features = tokens.shape
    rows, cols, c = height // patch, width // patch, features // (patch * patch)
    x = tokens[:, : rows * (cols + 1)].reshape(b, rows, cols + 1, patch, patch, c)[:, :, :cols]
    return x.transpose(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


class FlagDiTBlock(nnx.Module):
    """Pre-normed attention and FFN, each modulated by (shift, scale) and gated by an ungated-by-tanh gate."""

    def __init__(self, cfg: FlagDiTConfig, *, dtype: Dtype, param_dtype: Dtype, backend: Backend | None, rngs):
        norm = dict(eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.modulation = linear(
            cfg.cond_dim,
            6 * cfg.hidden_size,
            ("cond", "embed"),
            use_bias=True,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.attention_norm = rms_norm(cfg.hidden_size, "embed", **norm)
        self.ffn_norm = rms_norm(cfg.hidden_size, "embed", **norm)
        self.caption_norm = rms_norm(cfg.cross_attention_dim, "caption_embed", **norm)
        self.attention = Attention(cfg, dtype=dtype, param_dtype=param_dtype, backend=backend, rngs=rngs)
        self.feed_forward = FeedForward(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def caption_keys_values(self, caption: jax.Array) -> jax.Array:
        return self.attention.caption_keys_values(self.caption_norm(caption))

    def __call__(self, x: jax.Array, caption_kv: jax.Array | None, inputs: BlockInputs) -> jax.Array:
        modulation = self.modulation(jax.nn.silu(inputs.cond)).astype(jnp.float32)[:, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
        h = self.attention(
            self.attention_norm(x) * (1 + scale_msa) + shift_msa,
            self.caption_keys_values(inputs.caption) if caption_kv is None else caption_kv,
            inputs,
        )
        x = x + gate_msa * h.astype(jnp.float32)
        h = self.feed_forward(self.ffn_norm(x) * (1 + scale_mlp) + shift_mlp)
        return x + gate_mlp * h.astype(jnp.float32)


class FlagDiT(nnx.Module):
    """Flag-DiT. `dtype` is the compute dtype, `param_dtype` the storage dtype; with bfloat16 compute,
    norms, RoPE, softmax statistics and the residual stream stay float32."""

    def __init__(
        self,
        config: FlagDiTConfig,
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
        self.eol_token = nnx.Param(small(rngs.params(), (cfg.hidden_size,), param_dtype), **logical_axes("embed"))
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
            return FlagDiTBlock(cfg, dtype=dtype, param_dtype=param_dtype, backend=attention_backend, rngs=rngs)

        self.layers = stacked_blocks(rngs)
        self.final_norm = layer_norm(cfg.hidden_size, None, eps=1e-6, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.final_modulation = linear(cfg.cond_dim, 2 * cfg.hidden_size, ("cond", "embed"), kernel_init=zeros, **dense)
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
        linear_factor: float | None = None,
        ntk_factor: float | None = None,
        base_sequence_length: int | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        caption_kv: jax.Array | None = None,
        context_drop: int = 1,
    ) -> jax.Array:
        """Velocity (and learned sigma) for latents [B, C, H, W]: [B, out_channels, H, W].

        linear_factor and ntk_factor scale the RoPE as the original's rope_scaling_factor and ntk_factor
        (default: the config's, what the model was trained with); base_sequence_length turns on
        proportional attention, over the sequence attended, end-of-line tokens included (the demo
        passes `config.base_sequence_length`). A sampler may pass `rope`, tables from `image_rope`, and
        `caption_kv`, the caption's keys and values from `caption_keys_values`, each computed once.
        Context Drop is Next-DiT's: context_drop must be 1.
        """
        cfg, p = self.config, self.config.patch_size
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be [batch, {cfg.in_channels}, height, width], got {hidden_states.shape}"
            )
        if context_drop != 1:
            raise ValueError(f"context_drop={context_drop}: Context Drop is Next-DiT's; Flag-DiT takes 1")
        _, _, height, width = hidden_states.shape
        if rope is None:
            rope = self.image_rope(height, width, linear_factor=linear_factor, ntk_factor=ntk_factor)
        patches, eol, _ = flag_tokens(hidden_states, p)
        out = self.forward_tokens(
            patches,
            eol,
            None,
            rope,
            timestep,
            encoder_hidden_states,
            encoder_mask,
            base_sequence_length=base_sequence_length,
            caption_kv=caption_kv,
        )
        return unflag_tokens(out, height, width, p)

    def image_rope(
        self, height: int, width: int, *, linear_factor: float | None = None, ntk_factor: float | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """RoPE tables [1, tokens, head_dim / 2] for latents of height x width (end-of-line tokens included)."""
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p}")
        return self.rope((height // p) * (width // p + 1), linear_factor=linear_factor, ntk_factor=ntk_factor)

    def rope(
        self, length: int, *, linear_factor: float | None = None, ntk_factor: float | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """RoPE cos/sin tables [1, length, head_dim / 2] for a sequence of `length` tokens."""
        if length > ROPE_MAX_TOKENS:
            raise ValueError(f"{length} tokens exceed the RoPE table of {ROPE_MAX_TOKENS} positions")
        linear_factor = self.config.rope_scaling_factor if linear_factor is None else linear_factor
        ntk_factor = self.config.ntk_factor if ntk_factor is None else ntk_factor
        positions = jnp.arange(length)[None, :, None]
        return rope_frequencies(positions, self.config.head_dim, linear_factor=linear_factor, ntk_factor=ntk_factor)

    def forward_sequence(
        self,
        patches: jax.Array,
        positions: None,
        token_mask: jax.Array | None,
        end_of_line: jax.Array,
        timestep: jax.Array,
        caption: jax.Array,
        caption_mask: jax.Array,
    ) -> jax.Array:
        """`forward_tokens` on `FlagDiTConfig.token_sequence`'s tokens, RoPE'd by index (positions is None).
        No proportional attention, as trained."""
        rope = self.rope(patches.shape[1])
        return self.forward_tokens(patches, end_of_line, token_mask, rope, timestep, caption, caption_mask)

    @float32_products
    def forward_tokens(
        self,
        patches: jax.Array,
        end_of_line: jax.Array,
        token_mask: jax.Array | None,
        rope: tuple[jax.Array, jax.Array],
        timestep: jax.Array,
        caption: jax.Array,
        caption_mask: jax.Array,
        *,
        base_sequence_length: int | None = None,
        caption_kv: jax.Array | None = None,
    ) -> jax.Array:
        """The transformer on `flag_tokens`' sequence: patches [B, T, p*p*in_channels], end_of_line [B, T]
        and token_mask [B, T] (None: no padding), RoPE tables [B or 1, T, head_dim / 2] (`rope`).
        Pad tokens become the learned pad token and are never attended to. Returns [B, T, p*p*out_channels]."""
        cfg = self.config
        batch, num_tokens, _ = patches.shape
        check_conditioning(cfg, batch, timestep, caption, caption_mask, caption_kv)

        time_layers, caption_layers = (
            (self.time_linear_1, self.time_linear_2),
            (self.caption_pool_norm, self.caption_proj),
        )
        cond = conditioning(time_layers, caption_layers, timestep, caption, caption_mask)
        x = self.patch_embedder(patches).astype(jnp.float32)
        x = jnp.where(end_of_line[..., None], self.eol_token[...].astype(jnp.float32), x)
        if token_mask is not None:
            x = jnp.where(token_mask[..., None], x, self.pad_token[...].astype(jnp.float32))
        inputs = BlockInputs(
            cond=cond,
            caption=caption.astype(self.dtype),
            caption_mask=caption_mask.astype(bool),
            token_mask=token_mask,
            cos=rope[0],
            sin=rope[1],
            self_scale=self_attention_scale(cfg.head_dim, num_tokens, base_sequence_length),
        )
        x = run_layers(self.layers, x, caption_kv, inputs, remat=self.remat, scan_layers=self.scan_layers)

        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(cond)).astype(jnp.float32)[:, None, :], 2, axis=-1)
        return self.final_linear(self.final_norm(x) * (1 + scale) + shift).astype(jnp.float32)

    @float32_products
    def caption_keys_values(self, caption: jax.Array, caption_mask: jax.Array | None = None) -> jax.Array:
        """Every layer's keys and values of the caption [B, L, D]: [layers, 2, B, L, kv_heads, head_dim], for
        `caption_kv` (the mask is applied where they are attended to)."""
        return layers_caption_keys_values(self.layers, caption.astype(self.dtype))

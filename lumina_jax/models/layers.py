"""Shared building blocks: parameters with logical axis names, norms that compute in float32, configs."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lumina_jax.models.lora import LowRank

Dtype = jnp.dtype | type
# Keys diffusers writes into every config.json that say nothing about the architecture.
DIFFUSERS_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


class TransformerSizes:
    """Sizes that Next-DiT's and Flag-DiT's configs derive alike from their fields (hidden_size,
    num_attention_heads, num_kv_heads, in_channels, learn_sigma, multiple_of, ffn_dim_multiplier)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def cond_dim(self) -> int:
        """Width of the timestep + caption conditioning vector."""
        return min(self.hidden_size, 1024)

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU width: 2/3 of 4 x hidden_size, times ffn_dim_multiplier, rounded up to multiple_of."""
        inner = int(8 * self.hidden_size / 3)
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * -(-inner // self.multiple_of)


def ffn_fields(hidden_size: int, ffn_dim: int, base: int | None = None) -> dict[str, Any] | None:
    """multiple_of and ffn_dim_multiplier giving a SwiGLU of width `ffn_dim` (as read off a checkpoint);
    None if none does. A multiple_of alone where one of the usual ones gives it; else a multiplier m,
    which the width int(m * base) alone does not pin down: any m giving the same width computes the
    same model, and the one landing halfway into the width's last unit is far from int()'s rounding
    edge. base: the width before both, int(8 * hidden / 3) unless given (Lumina-Image 2.0's is 4 x hidden)."""
    base = int(8 * hidden_size / 3) if base is None else base
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if multiple_of * -(-base // multiple_of) == ffn_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
    multiplier = (ffn_dim + 0.5) / base
    return {"multiple_of": 1, "ffn_dim_multiplier": multiplier} if int(multiplier * base) == ffn_dim else None


def float32_products(method: Callable) -> Callable:
    """For a module method: with a float32 compute dtype (`self.dtype`), every matmul and convolution
    it traces multiplies in full float32. Accelerators otherwise multiply float32 in TF32 (GPUs) or
    in bfloat16 passes (TPUs), far from the float32 reference; bfloat16 modules keep the default."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if jnp.dtype(self.dtype) != jnp.float32:
            return method(self, *args, **kwargs)
        with jax.default_matmul_precision("highest"):
            return method(self, *args, **kwargs)

    return run


def config_from_dict(cls: type, values: dict[str, Any], ignored: tuple[str, ...], model_name: str) -> Any:
    """A config dataclass from a config.json's values: `ignored` keys dropped, unknown keys refused."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields - set(ignored))
    if unknown:
        raise ValueError(f"unknown {model_name} config fields {unknown}; known: {sorted(fields)}")
    return cls(**{k: v for k, v in values.items() if k in fields})


def logical_axes(*names: str | None) -> dict:
    """Parameter metadata naming its axes; `lumina_jax.sharding` maps the names onto a device mesh."""
    # Eager sharding would need a mesh at construction time; layout is decided later, in one place.
    return {"out_sharding": names, "eager_sharding": False}


class Linear(nnx.Linear):
    """nnx.Linear, plus the output of its low-rank adapter where one is attached (`models.lora`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter: LowRank | None = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y if self.adapter is None else y + self.adapter(x).astype(y.dtype)


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    kernel_init: Callable = nnx.initializers.xavier_uniform(),
) -> Linear:
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        kernel_metadata=logical_axes(*axes),
        bias_metadata=logical_axes(axes[1]),
        rngs=rngs,
    )


def rms_norm(features: int, axis: str, *, eps: float, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm with float32 statistics and output, whatever the compute dtype."""
    return nnx.RMSNorm(
        features,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_metadata=logical_axes(axis),
        rngs=rngs,
    )


def layer_norm(
    features: int, axis: str | None, *, eps: float, affine: bool, param_dtype: Dtype, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """LayerNorm with float32 statistics and output; two-pass variance, as PyTorch computes it."""
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_bias=affine,
        use_scale=affine,
        use_fast_variance=False,
        scale_metadata=logical_axes(axis),
        bias_metadata=logical_axes(axis),
        rngs=rngs,
    )

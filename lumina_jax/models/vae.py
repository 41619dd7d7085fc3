"""diffusers' `AutoencoderKL` in Flax NNX: the SDXL VAE of Lumina-Next and the FLUX VAE of Lumina-Image 2.0
(16 latent channels, no quant_conv or post_quant_conv, latents shifted as well as scaled).

Arrays at the boundary use diffusers' NCHW layout: images [B, 3, H, W] in [-1, 1], latents
[B, latent_channels, H/8, W/8]. Inside, everything runs NHWC, the layout XLA's convolutions are fastest in.
Parameters are named as diffusers names its modules, with single-entry lists folded
(`downsamplers.0` -> `downsample`, `attentions.0` -> `attention`, `to_out.0` -> `to_out`).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lumina_jax.models.attention import dot_product_attention
from lumina_jax.models.layers import (
    DIFFUSERS_BOOKKEEPING,
    Dtype,
    config_from_dict,
    float32_products,
    linear,
    logical_axes,
)

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish")  # diffusers' two names for x * sigmoid(x)
EPS = 1e-6  # every group norm of diffusers' VAE Encoder and Decoder
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this
# The defaults of `encode`'s and `decode`'s memory bounds. Most queries per attention chunk: the float32
# logits of a chunk take at most query_chunk x tokens x 4 bytes per image (512 MiB at 1024 px, 2 GiB at 2048 px).
ATTENTION_QUERY_CHUNK = 8192
# The decoder streams activations of more pixels than band_pixels in bands of whole rows of at most
# this many pixels (32 rows at 2048 px; `UpBlock.__call__`). Measured for the SDXL decoder at 2048 px,
# float32, on a v5e chip: 8.3 GiB of temporaries at 2^18, 6.3 GiB at 2^16.
DECODE_BAND_PIXELS = 2**16


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture, with the field names and defaults of diffusers' AutoencoderKL config.json."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable, as a static part of the model must be.
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if set(self.down_block_types) != {DOWN_BLOCK}:
            problems.append(f"down_block_types {list(self.down_block_types)} (only {DOWN_BLOCK} is supported)")
        if set(self.up_block_types) != {UP_BLOCK}:
            problems.append(f"up_block_types {list(self.up_block_types)} (only {UP_BLOCK} is supported)")
        blocks = len(self.block_out_channels)
        if not len(self.down_block_types) == len(self.up_block_types) == blocks:
            problems.append(
                f"{len(self.down_block_types)} down blocks, {len(self.up_block_types)} up blocks and "
                f"{blocks} block_out_channels (they must be as many)"
            )
        if self.act_fn not in ACTIVATIONS:
            problems.append(f"act_fn {self.act_fn!r} (supported: {', '.join(ACTIVATIONS)})")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            problems.append(
                f"block_out_channels {list(self.block_out_channels)} not all divisible by "
                f"norm_num_groups {self.norm_num_groups}"
            )
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block {self.layers_per_block} (at least 1)")
        if problems:
            raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AutoencoderKLConfig":
        return config_from_dict(cls, values, DIFFUSERS_BOOKKEEPING, "AutoencoderKL")

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def scale_latents(self, latents):
        """A posterior sample as the transformer's latents: (z - shift_factor) * scaling_factor."""
        return (latents - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale_latents(self, latents):
        """The transformer's latents as the decoder takes them (`scale_latents` undone)."""
        return latents / self.scaling_factor + (self.shift_factor or 0.0)


SDXL_VAE = AutoencoderKLConfig(
    down_block_types=(DOWN_BLOCK,) * 4,
    up_block_types=(UP_BLOCK,) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
)
# black-forest-labs/FLUX.1-dev's vae/config.json, which Lumina-Image 2.0 decodes with
FLUX_VAE = dataclasses.replace(
    SDXL_VAE,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def conv(
    in_features: int, out_features: int, kernel: int, *, stride: int = 1, dtype: Dtype, param_dtype: Dtype, rngs
) -> nnx.Conv:
    """PyTorch's Conv2d(kernel, padding=kernel // 2) on NHWC; strided ones unpadded (Downsample pads asymmetrically)."""
    pad = kernel // 2 if stride == 1 else 0
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata=logical_axes(None, None, "vae_in", "vae_out"),
        bias_metadata=logical_axes("vae_out"),
        rngs=rngs,
    )


class GroupNorm(nnx.GroupNorm):
    """PyTorch's GroupNorm over NHWC, float32 statistics (two-pass variance) and output.

    The statistics are reduced per channel first, then over each group's channels (equal counts:
    the same mean and variance), so x is never reshaped into [..., groups, channels per group]: on
    TPUs that splits the lane dimension and copies the whole activation. A streamed decoder takes
    the statistics of a whole activation and normalises it band by band (`statistics`, `normalize`).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.normalize(x, self.statistics(x))

    def statistics(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each channel's group mean and variance over x [B, H, W, C]: two [B, 1, 1, C] float32 arrays."""
        return self.statistics_from(Held(x).channel_mean)

    def statistics_from(self, channel_mean) -> tuple[jax.Array, jax.Array]:
        """The statistics from channel_mean(f), each channel's mean of f(x) over the pixels ([B, C])."""

        def per_group(values):  # [B, C] -> the mean of each channel's group, [B, 1, 1, C]
            batch, features = values.shape
            groups = values.reshape(batch, self.num_groups, features // self.num_groups).mean(-1)
            return jnp.repeat(groups, features // self.num_groups, axis=-1)[:, None, None, :]

        mean = per_group(channel_mean(lambda x: x))
        return mean, per_group(channel_mean(lambda x: jnp.square(x - mean)))

    def normalize(self, x: jax.Array, statistics: tuple[jax.Array, jax.Array]) -> jax.Array:
        """x [B, rows, W, C], any rows of the activation whose `statistics` are given."""
        mean, variance = statistics
        normalized = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(variance + self.epsilon)
        return normalized * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def group_norm(features: int, groups: int, *, param_dtype: Dtype, rngs) -> GroupNorm:
    return GroupNorm(
        features,
        num_groups=groups,
        epsilon=EPS,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_metadata=logical_axes("vae_channels"),
        bias_metadata=logical_axes("vae_channels"),
        rngs=rngs,
    )


def band_rows(height: int, width: int, band_pixels: int) -> int:
    """Rows per band for a streamed activation: the most that keep a band within band_pixels and
    divide the height; the height itself (one band: not streamed) when it fits in one band."""
    if height * width <= band_pixels:
        return height
    return next(r for r in range(max(band_pixels // width, 1), 0, -1) if height % r == 0)


@dataclasses.dataclass(frozen=True)
class Held:
    """An activation [B, H, W, C] held whole, read by rows."""

    array: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def rows(self, first: jax.Array, count: int) -> jax.Array:
        """Rows first .. first + count - 1; where they fall outside the image, the edge rows."""
        return jnp.take(self.array, jnp.clip(first + jnp.arange(count), 0, self.shape[1] - 1), axis=1)

    def channel_mean(self, f) -> jax.Array:
        """Each channel's mean of f(x) over the pixels, [B, C] float32."""
        return jnp.mean(f(self.array.astype(jnp.float32)), axis=(1, 2))

    def whole(self) -> jax.Array:
        return self.array


@dataclasses.dataclass(frozen=True)
class Upsampled:
    """Upsample(x) [B, 2H, 2W, C], never held whole: rows are computed from x's rows as they are read."""

    upsample: "Upsample"
    x: Held
    rows_per_band: int  # `band_rows` of this activation

    @property
    def shape(self) -> tuple[int, ...]:
        batch, height, width, features = self.x.shape
        return batch, 2 * height, 2 * width, features

    def rows(self, first: jax.Array, count: int) -> jax.Array:
        start = first - first % 2  # the first of the two output rows of the input row that gives `first`
        pairs = (count + 2) // 2  # input rows whose output rows cover first .. first + count - 1
        up = self.upsample.upsample_rows(zero_padded_rows(self.x, start // 2 - 1, pairs + 2))
        return jax.lax.dynamic_slice_in_dim(up, first - start, count, axis=1)

    def channel_mean(self, f) -> jax.Array:
        """Summed band by band (`rows_per_band`), each computed as it is read."""
        batch, height, width, features = self.shape
        rows = self.rows_per_band

        def add_band(total, start):
            return total + jnp.sum(f(self.rows(start, rows).astype(jnp.float32)), axis=(1, 2)), None

        total = jax.lax.scan(add_band, jnp.zeros((batch, features), jnp.float32), jnp.arange(0, height, rows))[0]
        return total / (height * width)

    def whole(self) -> jax.Array:
        return self.upsample(self.x.whole())


Source = Held | Upsampled


def zero_padded_rows(source: Source, first: jax.Array, count: int, prepare=None) -> jax.Array:
    """prepare(source)'s rows first .. first + count - 1, zero outside the image: a window as a
    convolution's zero padding reads it (prepare, e.g. normalise and activate, comes before the padding)."""
    window = source.rows(first, count)
    window = window if prepare is None else prepare(window)
    index = first + jnp.arange(count)
    inside = (index >= 0) & (index < source.shape[1])
    return jnp.where(inside[None, :, None, None], window, 0)


def stream_bands(band, height: int, rows: int, axis: int = 1) -> jax.Array:
    """band(start) for start = 0, rows, 2 rows, ... < height, one at a time (`lax.map`), joined along
    `axis` (the rows axis of the bands): only one band's temporaries exist at a time."""
    bands = jax.lax.map(lambda i: band(i * rows), jnp.arange(height // rows))  # [bands, ..., rows, ...]
    bands = jnp.moveaxis(bands, 0, axis)
    shape = bands.shape
    return bands.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :])


def conv_valid_rows(conv: nnx.Conv, window: jax.Array) -> jax.Array:
    """A stride-1 conv on a window whose rows already carry the padding (columns are padded here)."""
    pad = conv.kernel_size[1] // 2
    out = jax.lax.conv_general_dilated(
        window.astype(conv.dtype),
        conv.kernel[...].astype(conv.dtype),
        (1, 1),
        ((0, 0), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return out + conv.bias[...].astype(conv.dtype)


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D without a time embedding: x + conv2(act(norm2(conv1(act(norm1(x))))))."""

    def __init__(self, in_features: int, out_features: int, groups: int, *, dtype, param_dtype, rngs):
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = group_norm(in_features, groups, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv(in_features, out_features, 3, **layer)
        self.norm2 = group_norm(out_features, groups, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = conv(out_features, out_features, 3, **layer)
        self.conv_shortcut = conv(in_features, out_features, 1, **layer) if in_features != out_features else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut.astype(jnp.float32) + h.astype(jnp.float32)

    def streamed(self, source: Source, rows: int) -> jax.Array:
        """The same block computed in bands of rows (`stream_bands`), for activations too large to
        hold several copies of: each norm's statistics are taken over its whole input first, then
        each band is normalised, activated and convolved alone. The input may be one that is never
        held whole (`Upsampled`)."""
        height = source.shape[1]

        def activated(norm, statistics):
            return lambda window: jax.nn.silu(norm.normalize(window, statistics))

        prepare1 = activated(self.norm1, self.norm1.statistics_from(source.channel_mean))
        h = Held(
            stream_bands(
                lambda start: conv_valid_rows(self.conv1, zero_padded_rows(source, start - 1, rows + 2, prepare1)),
                height,
                rows,
            )
        )
        prepare2 = activated(self.norm2, self.norm2.statistics_from(h.channel_mean))

        def band(start):
            shortcut = source.rows(start, rows)
            shortcut = shortcut if self.conv_shortcut is None else self.conv_shortcut(shortcut)
            h_window = zero_padded_rows(h, start - 1, rows + 2, prepare2)
            return shortcut.astype(jnp.float32) + conv_valid_rows(self.conv2, h_window).astype(jnp.float32)

        return stream_bands(band, height, rows)


class Downsample(nnx.Module):
    """diffusers' Downsample2D with padding=0: pad one zero row and column at the end, then a stride-2 conv."""

    def __init__(self, features: int, *, dtype, param_dtype, rngs):
        self.conv = conv(features, features, 3, stride=2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


def upsampled_taps(kernel: jax.Array, axis: int) -> jax.Array:
    """A 3-tap kernel axis over a x2 nearest-upsampled input as 2 taps over the input itself.

    An even output row reads input rows (i-1, i, i) through taps (0, 1, 2), an odd one (i, i, i+1):
    taps on the same input row add up. Returns the axis with 2 taps and a new axis of the output
    row's parity (0 even, 1 odd) before the last.
    """
    t0, t1, t2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    return jnp.stack([jnp.stack([t0, t1 + t2], axis), jnp.stack([t0 + t1, t2], axis)], axis=-2)


class Upsample(nnx.Module):
    """diffusers' Upsample2D: nearest-neighbour x2, then a 3x3 conv.

    Computed without building the x2 image: each output pixel's 3x3 window covers a 2x2 window of
    the input, so the four output phases (row and column parity) are one 2x2 conv over the input
    with 4x the output channels, 2.25x fewer multiplies. The same sums, in another order.
    """

    def __init__(self, features: int, *, dtype, param_dtype, rngs):
        self.conv = conv(features, features, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.upsample_rows(jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0))))

    def upsample_rows(self, window: jax.Array) -> jax.Array:
        """Rows r .. r+n-1 of the input, x2: from a window of its rows r-1 .. r+n (zero beyond the image)."""
        batch, height, width, features = window.shape
        height -= 2
        dtype = self.conv.dtype
        taps = upsampled_taps(upsampled_taps(self.conv.kernel[...].astype(jnp.float32), 0), 1)  # [2,2,in,2,2,out]
        kernel = taps.reshape(2, 2, features, -1).astype(dtype)
        phases = jax.lax.conv_general_dilated(
            window.astype(dtype), kernel, (1, 1), ((0, 0), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        ).reshape(batch, height + 1, width + 1, 2, 2, -1)
        # Output pixel (2i + a, 2j + b) is phase (a, b) of the 2x2 window at padded position (i + a, j + b).
        rows = [jnp.stack([phases[:, a : a + height, b : b + width, a, b] for b in range(2)], axis=3) for a in range(2)]
        out = jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, -1)
        return out + self.conv.bias[...].astype(dtype)


class SpatialSelfAttention(nnx.Module):
    """The mid block's single-head attention over all pixels, with a residual connection."""

    def __init__(self, features: int, groups: int, *, dtype, param_dtype, rngs):
        dense = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = group_norm(features, groups, param_dtype=param_dtype, rngs=rngs)
        self.to_q = linear(features, features, ("vae_in", "vae_out"), **dense)
        self.to_k = linear(features, features, ("vae_in", "vae_out"), **dense)
        self.to_v = linear(features, features, ("vae_in", "vae_out"), **dense)
        self.to_out = linear(features, features, ("vae_in", "vae_out"), **dense)

    def __call__(self, x: jax.Array, query_chunk: int) -> jax.Array:
        """Attention in chunks of at most query_chunk queries."""
        batch, height, width, features = x.shape
        tokens = height * width
        h = self.group_norm(x).reshape(batch, tokens, 1, features)
        query, key, value = self.to_q(h), self.to_k(h), self.to_v(h)

        def attend(queries):  # [B, chunk, 1, C]
            return dot_product_attention(queries, key, value, scale=features**-0.5, backend="xla")

        # Heads of 512 features are beyond cuDNN's fused attention, and XLA's holds all logits at
        # once: attend in equal chunks of queries (exact, as each query's softmax is its own).
        chunks = -(-tokens // query_chunk)
        size = -(-tokens // chunks)
        query = jnp.pad(query, ((0, 0), (0, chunks * size - tokens), (0, 0), (0, 0)))
        query = jnp.moveaxis(query.reshape(batch, chunks, size, 1, features), 1, 0)
        out = jnp.moveaxis(jax.lax.map(attend, query), 0, 1).reshape(batch, chunks * size, features)[:, :tokens]
        out = self.to_out(out.reshape(batch, height, width, features))
        return x.astype(jnp.float32) + out.astype(jnp.float32)


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2D as the VAE builds it: resnet, attention (optional), resnet."""

    def __init__(self, features: int, groups: int, add_attention: bool, *, dtype, param_dtype, rngs):
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(features, features, groups, **layer) for _ in range(2)])
        self.attention = SpatialSelfAttention(features, groups, **layer) if add_attention else None

    def __call__(self, x: jax.Array, query_chunk: int) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x, query_chunk)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then a downsample except in the last block."""

    def __init__(self, in_features, out_features, layers, groups, add_downsample, *, dtype, param_dtype, rngs):
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = [in_features] + [out_features] * layers
        self.resnets = nnx.List([ResnetBlock(i, o, groups, **layer) for i, o in zip(widths, widths[1:])])
        self.downsample = Downsample(out_features, **layer) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """UpDecoderBlock2D: resnets, then an upsample except in the last block."""

    def __init__(self, in_features, out_features, layers, groups, add_upsample, *, dtype, param_dtype, rngs):
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = [in_features] + [out_features] * layers
        self.resnets = nnx.List([ResnetBlock(i, o, groups, **layer) for i, o in zip(widths, widths[1:])])
        self.upsample = Upsample(out_features, **layer) if add_upsample else None

    def __call__(self, x: jax.Array | Upsampled, band_pixels: int) -> jax.Array | Upsampled:
        """Activations larger than band_pixels stream (`ResnetBlock.streamed`); an upsampled one
        that the next block streams is computed as that block reads it (`Upsampled`): the decoder's
        largest activation is never held whole."""
        for resnet in self.resnets:
            height, width = x.shape[1:3]
            rows = band_rows(height, width, band_pixels)
            if rows < height:
                x = resnet.streamed(x if isinstance(x, Upsampled) else Held(x), rows)
            else:
                x = resnet(x.whole() if isinstance(x, Upsampled) else x)
        if self.upsample is None:
            return x
        height, width = 2 * x.shape[1], 2 * x.shape[2]
        rows = band_rows(height, width, band_pixels)
        return Upsampled(self.upsample, Held(x), rows) if rows < height else self.upsample(x)


class Encoder(nnx.Module):
    """Images [B, H, W, in] -> posterior parameters [B, H/f, W/f, 2 * latent] (before quant_conv)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype, param_dtype, rngs):
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, widths[0], 3, **layer)
        self.down_blocks = nnx.List(
            [
                DownBlock(widths[max(i - 1, 0)], w, cfg.layers_per_block, groups, i < len(widths) - 1, **layer)
                for i, w in enumerate(widths)
            ]
        )
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_block_add_attention, **layer)
        self.conv_norm_out = group_norm(widths[-1], groups, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(widths[-1], 2 * cfg.latent_channels, 3, **layer)

    def __call__(self, x: jax.Array, query_chunk: int) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x, query_chunk))))


class Decoder(nnx.Module):
    """Latents [B, h, w, latent] (after post_quant_conv) -> images [B, out, h*f, w*f]."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype, param_dtype, rngs):
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, widths[0], 3, **layer)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention, **layer)
        self.up_blocks = nnx.List(
            [
                UpBlock(widths[max(i - 1, 0)], w, cfg.layers_per_block + 1, groups, i < len(widths) - 1, **layer)
                for i, w in enumerate(widths)
            ]
        )
        self.conv_norm_out = group_norm(widths[-1], groups, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(widths[-1], cfg.out_channels, 3, **layer)

    def __call__(self, x: jax.Array, band_pixels: int, query_chunk: int) -> jax.Array:
        """Returns NCHW [B, out, H, W]: an image with its few channels last would take a whole lane
        (128 channels) per pixel on TPUs."""
        x = self.mid_block(self.conv_in(x), query_chunk)
        for block in self.up_blocks:
            x = block(x, band_pixels)
        return self.output(x, band_pixels)

    def output(self, x: jax.Array, band_pixels: int) -> jax.Array:
        """The last norm, activation and convolution, to NCHW; band by band for a large x."""
        batch, height, width, _ = x.shape
        rows = band_rows(height, width, band_pixels)
        if rows == height:
            return jnp.transpose(self.conv_out(jax.nn.silu(self.conv_norm_out(x))), (0, 3, 1, 2))
        statistics = self.conv_norm_out.statistics(x)

        def band(start):  # [B, out, rows, W]
            prepare = lambda window: jax.nn.silu(self.conv_norm_out.normalize(window, statistics))  # noqa: E731
            window = zero_padded_rows(Held(x), start - 1, rows + 2, prepare)
            return jnp.transpose(conv_valid_rows(self.conv_out, window), (0, 3, 1, 2))

        return stream_bands(band, height, rows, axis=2)


class AutoencoderKL(nnx.Module):
    """The KL autoencoder. `dtype` is the compute dtype, `param_dtype` the storage dtype; with
    bfloat16 compute, group norms and the residual stream stay float32. Outputs are float32."""

    def __init__(
        self, config: AutoencoderKLConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs
    ):
        cfg = self.config = config
        self.dtype = dtype
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg, **layer)
        self.decoder = Decoder(cfg, **layer)
        self.quant_conv = conv(2 * latent, 2 * latent, 1, **layer) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(latent, latent, 1, **layer) if cfg.use_post_quant_conv else None

    @float32_products
    def encode(self, images: jax.Array, *, query_chunk: int = ATTENTION_QUERY_CHUNK) -> tuple[jax.Array, jax.Array]:
        """Images [B, in_channels, H, W] in [-1, 1] -> the posterior's (mean, logvar), each
        [B, latent_channels, H/f, W/f] (f = 8 for the SDXL VAE); logvar clamped to [-30, 20] as diffusers does.
        The mid block attends in chunks of at most query_chunk queries (the same result)."""
        cfg, f = self.config, self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != cfg.in_channels:
            raise ValueError(f"images must be [batch, {cfg.in_channels}, height, width], got {images.shape}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image size {images.shape[2]}x{images.shape[3]} is not divisible by {f}")
        moments = self.encoder(jnp.transpose(images, (0, 2, 3, 1)), query_chunk)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = jnp.transpose(moments.astype(jnp.float32), (0, 3, 1, 2))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @float32_products
    def decode(
        self, latents: jax.Array, *, band_pixels: int = DECODE_BAND_PIXELS, query_chunk: int = ATTENTION_QUERY_CHUNK
    ) -> jax.Array:
        """Latents [B, latent_channels, h, w], already unscaled (`AutoencoderKLConfig.unscale_latents`) -> images
        [B, out_channels, h*f, w*f], nominally in [-1, 1] (not clipped). Activations of more than band_pixels
        pixels stream in bands of rows, and the mid block attends in chunks of at most query_chunk queries
        (the same result, in less memory)."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
            raise ValueError(f"latents must be [batch, {cfg.latent_channels}, height, width], got {latents.shape}")
        x = jnp.transpose(latents, (0, 2, 3, 1))
        if self.post_quant_conv is not None:
            x = self.post_quant_conv(x)
        return self.decoder(x, band_pixels, query_chunk).astype(jnp.float32)

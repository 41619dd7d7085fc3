"""Low-rank adapters (LoRA) beside a model's linear layers, unmerged: y = W x + ((A x) * scale) B.

An adapter is attached to a `layers.Linear` as its `adapter` attribute, after the model is built, so a model
with adapters is the same model (same parameter paths, same key maps) with a few more parameters. A is
[in, rank] and B [rank, out] (a stacked layer's carry the layer axis first, as its kernel does), both
`nnx.LoRAParam`, so `nnx.split(model, nnx.LoRAParam, ...)` separates what trains from the frozen weights.

`scale` is a variable per rank, not a constant: several adapters on one layer are one adapter of their
ranks joined, each rank scaled by its own adapter's alpha / rank times the user's strength, and a strength
changed later changes a variable's value, not the compiled program. PEFT's conventions throughout: A starts
uniform in +-1/sqrt(in) (kaiming_uniform with a = sqrt(5)), B at zero, dropout on the adapter's input only
(while training: `model.eval()` turns it off).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class LoraScale(nnx.Variable):
    """Each rank's factor (alpha / rank, times the adapter's strength): state, not a trained parameter."""


class LoraDropoutKey(nnx.Variable):
    """The raw key of an adapter's dropout mask, set anew for every training step (`reseed_dropout`)."""


class LowRank(nnx.Module):
    """The adapter of one linear layer (or of a stack of them, with `kernel`'s leading layer axis)."""

    def __init__(
        self,
        down: jax.Array,
        up: jax.Array,
        scale: jax.Array,
        axes: Sequence[str | None],
        *,
        dropout: float = 0.0,
        dtype,
    ):
        *lead, in_axis, out_axis = axes
        sharded = lambda *names: {"out_sharding": (*lead, *names), "eager_sharding": False}  # noqa: E731
        self.down = nnx.LoRAParam(down, **sharded(in_axis, None))
        self.up = nnx.LoRAParam(up, **sharded(None, out_axis))
        self.scale = LoraScale(jnp.asarray(scale, jnp.float32), **sharded(None))
        self.dropout = dropout
        self.deterministic = False  # `model.eval()` turns the dropout off, as for nnx.Dropout
        self.dropout_key = LoraDropoutKey(jnp.zeros((*down.shape[:-2], 2), jnp.uint32)) if dropout else None
        self.dtype = dtype

    @classmethod
    def initialized(
        cls, kernel: nnx.Param, rank: int, scale: float, *, dropout: float, dtype, param_dtype, key: jax.Array
    ) -> "LowRank":
        """A new adapter for `kernel` ([..., in, out]) as PEFT starts one: the layer's output unchanged."""
        *lead, fan_in, fan_out = kernel.shape
        bound = fan_in**-0.5
        down = jax.random.uniform(key, (*lead, fan_in, rank), param_dtype, -bound, bound)
        up = jnp.zeros((*lead, rank, fan_out), param_dtype)
        return cls(down, up, jnp.full((*lead, rank), scale), kernel_axes(kernel), dropout=dropout, dtype=dtype)

    def joined(self, other: "LowRank") -> "LowRank":
        """This adapter and `other` as one, their ranks side by side (several adapters on one layer)."""
        return LowRank(
            jnp.concatenate([self.down[...], other.down[...]], axis=-1),
            jnp.concatenate([self.up[...], other.up[...]], axis=-2),
            jnp.concatenate([self.scale[...], other.scale[...]], axis=-1),
            _axes_of(self.down, self.up),
            dropout=max(self.dropout, other.dropout),
            dtype=self.dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.dropout and not self.deterministic:
            keep = jax.random.bernoulli(self.dropout_key[...], 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0).astype(self.dtype)
        h = jnp.dot(x, self.down[...].astype(self.dtype))
        h = h * self.scale[...].astype(self.dtype)
        return jnp.dot(h, self.up[...].astype(self.dtype))


def kernel_axes(kernel: nnx.Param) -> tuple[str | None, ...]:
    """A kernel's logical axis names (its layer axis first in a stack): an adapter's halves are named after them."""
    return tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)


def _axes_of(down: nnx.LoRAParam, up: nnx.LoRAParam) -> tuple[str | None, ...]:
    """The kernel's axes again, from an adapter's halves: (..., in) from A's and out from B's."""
    return (*kernel_axes(down)[:-1], kernel_axes(up)[-1])


def adaptable_layers(model: nnx.Module) -> dict[tuple[str, ...], nnx.Module]:
    """The model's linear layers that take an adapter, by their path of attribute names."""
    return {tuple(map(str, path)): node for path, node in nnx.iter_graph(model) if hasattr(node, "adapter")}


def add_adapters(
    model: nnx.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    param_dtype=jnp.float32,
    key: jax.Array,
) -> list[tuple[str, ...]]:
    """Attach a new adapter of `rank` (scaled alpha / rank) to every linear layer whose path names one of
    `targets` (an attribute name such as "attention", "feed_forward", "modulation" or "to_q"), in place;
    returns the adapted paths. A target that names no linear layer is an error listing the names there are."""
    layers = adaptable_layers(model)
    names = sorted({name for path in layers for name in path if not name.isdigit()})
    unknown = [target for target in targets if target not in names]
    if unknown or not targets:
        missing = unknown or "none given"
        raise ValueError(f"LoRA targets {list(targets)}: {missing} name no linear layer; the names are {names}")
    chosen = [path for path in layers if set(path) & set(targets)]
    for index, path in enumerate(chosen):
        layer = layers[path]
        layer.adapter = LowRank.initialized(
            layer.kernel,
            rank,
            alpha / rank,
            dropout=dropout,
            dtype=layer.dtype,
            param_dtype=param_dtype,
            key=jax.random.fold_in(key, index),
        )
    return chosen


def attach(layer: nnx.Module, adapter: LowRank) -> None:
    """Give `layer` the adapter, beside any it has already (their ranks joined)."""
    layer.adapter = adapter if layer.adapter is None else layer.adapter.joined(adapter)


def reseed_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Fresh dropout masks for every adapter with dropout: a key per adapter, per layer of a stack."""
    adapters = [node for _, node in nnx.iter_graph(model) if isinstance(node, LowRank) and node.dropout]
    for index, adapter in enumerate(adapters):
        lead = adapter.dropout_key.shape[:-1]  # the layer axis of a stack
        adapter_key = jax.random.fold_in(key, index)
        adapter.dropout_key[...] = jax.random.split(adapter_key, lead) if lead else adapter_key

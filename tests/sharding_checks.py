"""Sharded against one-device runs, on simulated CPU devices; prints the measurements as JSON.

Run by tests/test_sharding.py in a fresh process, because the device count is fixed when JAX
starts: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from lumina_jax import sharding
from lumina_jax.models.nextdit import PRESETS, NextDiT, NextDiTConfig
from lumina_jax.training.step import TrainBatch, init_train_state, make_optimizer, predict_velocity, train_step

# Every width divides by 8 except the 4 query heads' gates: the tensor=8 mesh exercises the fallback.
CONFIG = NextDiTConfig(
    sample_size=8, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    multiple_of=32, cross_attention_dim=32,
)  # fmt: skip
MESHES = {"data2_fsdp4": dict(data=2, fsdp=4), "fsdp8": dict(), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}
TRAINED_MESHES = ("data2_fsdp4", "fsdp8")


def random_model() -> NextDiT:
    """float32, rematerialised as for training, with every parameter randomised (gates and the
    zero-initialised projections included) so that every path carries signal and gradient."""
    model = NextDiT(CONFIG, remat=True, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def mixed_size_batch() -> tuple[TrainBatch, jax.Array, jax.Array]:
    """8 latents of two sizes (padded), captions of 6 tokens, and the empty caption."""
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal((4, 8, 8) if i % 2 else (4, 4, 6), np.float32) for i in range(8)]
    caption = rng.standard_normal((8, 6, CONFIG.cross_attention_dim), np.float32)
    mask = np.arange(6)[None] < rng.integers(1, 7, 8)[:, None]
    batch = TrainBatch.from_latents([jnp.asarray(x) for x in latents], caption, mask, CONFIG.patch_size)
    return batch, jnp.asarray(rng.standard_normal((1, CONFIG.cross_attention_dim), np.float32)), jnp.ones(1, bool)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def max_tree_error(ours, reference) -> float:
    """The largest relative_error over the arrays of two matching pytrees."""
    return max(jax.tree.leaves(jax.tree.map(relative_error, ours, reference)))


def max_tree_difference(ours, reference) -> float:
    """The largest absolute difference over the arrays of two matching pytrees."""
    return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), ours, reference)))


def stored_fraction(tree) -> float:
    """Elements one device stores over the elements of the tree: 1 when everything is replicated."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) for x in leaves) / sum(x.size for x in leaves)


def specs(tree) -> dict[str, str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): str(x.sharding.spec) for path, x in flat}


@jax.jit
def forward(params, batch, t):
    model = nnx.merge(graphdef, params)
    args = (batch.patches, batch.positions, batch.token_mask, t, batch.caption, batch.caption_mask)
    return predict_velocity(model, *args)


def released_model_specs() -> dict[str, dict[str, str]]:
    """Layouts of the released 2B model's parameters (abstract, nothing allocated) on 8 devices."""
    abstract = nnx.eval_shape(lambda: NextDiT(PRESETS["NextDiT_2B_GQA_patch2"], rngs=nnx.Rngs(0)))
    layouts = {}
    for name, axes in {"tensor8": dict(fsdp=1, tensor=8), "fsdp4_tensor2": dict(fsdp=4, tensor=2)}.items():
        shardings = sharding.parameter_shardings(abstract, sharding.make_mesh(**axes))
        flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
        layouts[name] = {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}
    return layouts


def mesh_errors() -> dict[str, str]:
    messages = {}
    for axes in (dict(data=3), dict(data=2, fsdp=3, tensor=1)):
        try:
            sharding.make_mesh(**axes)
        except ValueError as error:
            messages[str(axes)] = str(error)
    return messages


model = random_model()
graphdef, params = nnx.split(model)
batch, empty_caption, empty_mask = mixed_size_batch()
t = jnp.linspace(0.05, 0.95, 8)
optimizer = make_optimizer()
results = {"devices": jax.device_count(), "mesh_errors": mesh_errors(), "released": released_model_specs()}

reference_velocity = forward(params, batch, t)
_, state = init_train_state(model, optimizer, jax.random.PRNGKey(0))
reference_state, reference_metrics = train_step(graphdef, state, batch, empty_caption, empty_mask, optimizer=optimizer)

for name, axes in MESHES.items():
    mesh = sharding.make_mesh(**axes)
    placed = jax.device_put(params, sharding.parameter_shardings(params, mesh))
    velocity = forward(placed, jax.device_put(batch, sharding.batch_sharding(mesh)), t)
    entry = {
        "forward_error": relative_error(velocity, reference_velocity),
        "param_fraction": stored_fraction(placed),
        "param_specs": specs(placed),
    }
    if name in TRAINED_MESHES:
        _, state = init_train_state(model, optimizer, jax.random.PRNGKey(0), mesh=mesh)
        initial_specs = specs(state)
        sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        state, metrics = train_step(
            graphdef, state, sharded_batch, empty_caption, empty_mask, optimizer=optimizer, mesh=mesh
        )
        adam = state.opt_state.inner_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
        reference_adam = reference_state.opt_state.inner_state[1][0]
        entry |= {
            "loss_error": relative_error(metrics["loss"], reference_metrics["loss"]),
            "grad_norm_error": relative_error(metrics["grad_norm"], reference_metrics["grad_norm"]),
            # mu after one step is 0.1 x the clipped gradient: the gradients themselves
            "gradient_error": max_tree_error(adam.mu, reference_adam.mu),
            "params_error": max_tree_error(state.params, reference_state.params),
            "ema_error": max_tree_error(state.ema_params, reference_state.ema_params),
            "params_max_difference": max_tree_difference(state.params, reference_state.params),
            "state_fraction": stored_fraction(state),
            "state_specs_kept": specs(state) == initial_specs,
            "mu_specs": specs(adam.mu),
            "ema_specs": specs(state.ema_params),
        }
    results[name] = entry

print(json.dumps(results, default=str))

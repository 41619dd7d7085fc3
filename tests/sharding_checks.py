"""Sharded against one-device runs on simulated CPU devices; prints the measurements as JSON.

tests/test_sharding.py runs it in a fresh process, because the device count is fixed when JAX
starts: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py
The tiny model and batch builders are shared with tests/test_train_step.py.
"""

import json
import math
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from lumina_jax import sharding
from lumina_jax.models.lora import add_adapters
from lumina_jax.models.nextdit import PRESETS, NextDiT, NextDiTConfig
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.training.digits import DIGIT_WORDS, write_base_pipeline
from lumina_jax.training.step import (
    ClippedAdamW,
    TrainBatch,
    TrainState,
    frozen_weights,
    init_train_state,
    predict_velocity,
    train_step,
)
from lumina_jax.weights.lora import merge_lora

# Every width divides by 8 except the 4 query heads' gates, so tensor=8 exercises the fallback.
TINY = NextDiTConfig(
    sample_size=8,
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_kv_heads=2,
    multiple_of=32,
    cross_attention_dim=32,
)
MESHES = {
    "data2_fsdp4": dict(data=2, fsdp=4),
    "fsdp8": dict(),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}
TRAINED_MESHES = ("data2_fsdp4", "fsdp8")
LR = 1e-4
ADAM_B1 = 0.9
# Adam's first update is lr * g / (|g| + eps), eps 1e-8: a gradient error d moves it by at most
# lr * eps * d / g^2, under 0.01 d where |g| >= 1e-5. Smaller gradients (some are zero in exact
# arithmetic and pure rounding noise here) get updates of any size up to lr on any two compilations.
SETTLED_GRADIENT = 1e-5


def tiny_model(dtype=jnp.float32, seed: int = 0, attention_backend=None) -> NextDiT:
    """The tiny Next-DiT, float32 parameters, rematerialised as for training, with every parameter
    random (gates and zero-initialised projections too) so that every path carries signal and
    gradient. Built abstractly and filled from NumPy: eager initialisation compiles op by op."""
    model = nnx.eval_shape(
        lambda: NextDiT(
            TINY,
            dtype=dtype,
            param_dtype=jnp.float32,
            remat="full",
            attention_backend=attention_backend,
            rngs=nnx.Rngs(0),
        )
    )
    rng = np.random.default_rng(seed)

    def random_value(path, abstract):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(abstract.shape).astype(np.float32)
        if "kernel" in name:
            return jnp.asarray(noise * abstract.shape[-2] ** -0.5)
        if "scale" in name:
            return jnp.asarray(1 + 0.2 * noise)
        return jnp.asarray(0.3 * noise)

    nnx.update(model, jax.tree_util.tree_map_with_path(random_value, nnx.state(model)))
    return model


def padded_batch(sizes, seed: int = 0) -> TrainBatch:
    """Latents [4, h, w] of the given sizes (padded to the longest), captions of 6 tokens, ragged masks."""
    rng = np.random.default_rng(seed)
    latents = [jnp.asarray(rng.standard_normal((4, h, w), np.float32)) for h, w in sizes]
    caption = rng.standard_normal((len(sizes), 6, TINY.cross_attention_dim), np.float32)
    mask = np.arange(6)[None] < rng.integers(1, 7, len(sizes))[:, None]
    return TrainBatch.from_latents(latents, caption, mask, TINY)


def empty_caption(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Stand-in features of "" (one token, as Gemma encodes it: <bos>) and its mask."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((1, TINY.cross_attention_dim), np.float32)), jnp.ones(1, bool)


def host(tree) -> list[np.ndarray]:
    """The arrays of a pytree as float64 NumPy arrays, in leaf order."""
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def max_difference(ours: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, reference))


def max_magnitude(arrays: list[np.ndarray]) -> float:
    return max(float(np.abs(a).max()) for a in arrays)


def stored_fraction(tree) -> float:
    """Elements one device stores over the elements of the tree: 1 when everything is replicated."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) for x in leaves) / sum(x.size for x in leaves)


def laid_out_as(tree, shardings) -> bool:
    """Each array of tree has the layout of the matching sharding."""
    return all(
        a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    )


def specs(shardings) -> dict[str, str]:
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {jax.tree_util.keystr(path).removesuffix(".value"): str(s.spec) for path, s in flat}


def released_model_specs() -> dict[str, dict[str, str]]:
    """Layouts of the released 2B model's parameters (abstract, nothing allocated) on 8 devices."""
    abstract = nnx.eval_shape(lambda: NextDiT(PRESETS["NextDiT_2B_GQA_patch2"], rngs=nnx.Rngs(0)))
    return {
        name: specs(sharding.parameter_shardings(abstract, sharding.make_mesh(**axes)))
        for name, axes in {"tensor8": dict(fsdp=1, tensor=8), "fsdp4_tensor2": dict(fsdp=4, tensor=2)}.items()
    }


def mesh_errors() -> dict[str, str]:
    messages = {}
    for axes in (dict(data=3), dict(data=2, fsdp=3)):
        try:
            sharding.make_mesh(**axes)
            messages[str(axes)] = "no error"
        except ValueError as error:
            messages[str(axes)] = str(error)
    return messages


def adam_state(state: TrainState):
    return state.opt_state.inner_state[1][0]  # inject_hyperparams(chain(clip, adamw)): adamw's ScaleByAdamState


def training_comparison(state, metrics, reference_state, reference_metrics, placement) -> dict:
    # After one step mu is (1 - b1) x the clipped gradient: the gradients themselves.
    gradient = [m / (1 - ADAM_B1) for m in host(adam_state(state).mu)]
    reference_gradient = [m / (1 - ADAM_B1) for m in host(adam_state(reference_state).mu)]
    settled = [np.abs(g) >= SETTLED_GRADIENT for g in reference_gradient]
    params, reference_params = host(state.params), host(reference_state.params)
    return {
        "loss_error": abs(float(metrics["loss"]) / float(reference_metrics["loss"]) - 1),
        "grad_norm_error": abs(float(metrics["grad_norm"]) / float(reference_metrics["grad_norm"]) - 1),
        "gradient_error": max_difference(gradient, reference_gradient) / max_magnitude(reference_gradient),
        "settled_params_difference": max(
            float(np.abs(a - b)[s].max(initial=0)) for a, b, s in zip(params, reference_params, settled)
        ),
        "settled_fraction": sum(int(s.sum()) for s in settled) / sum(s.size for s in settled),
        "params_magnitude": max_magnitude(reference_params),
        "ema_difference": max_difference(host(state.ema_params), host(reference_state.ema_params)),
        "state_fraction": stored_fraction(state),
        "params_laid_out_by_rules": laid_out_as(state.params, placement),
        "optimizer_and_ema_laid_out_as_params": all(
            laid_out_as(tree, placement) for tree in (adam_state(state).mu, adam_state(state).nu, state.ema_params)
        ),
    }


def main() -> dict:
    model = tiny_model()
    graphdef, params = nnx.split(model)
    batch = padded_batch([(4, 6), (8, 8)] * 4)
    empty, empty_mask = empty_caption()
    t = jnp.linspace(0.05, 0.95, 8)
    optimizer = ClippedAdamW(lr=LR)

    @jax.jit
    def forward(params, batch):
        inputs = (batch.patches, batch.positions, batch.token_mask, t, batch.caption, batch.caption_mask)
        return predict_velocity(nnx.merge(graphdef, params), *inputs)

    results = {
        "devices": jax.device_count(),
        "mesh_errors": mesh_errors(),
        "released": released_model_specs(),
        "tiny_tensor8": specs(sharding.parameter_shardings(params, sharding.make_mesh(fsdp=1, tensor=8))),
    }
    reference_velocity = np.asarray(forward(params, batch), np.float64)
    _, state = init_train_state(model, optimizer, jax.random.PRNGKey(0))
    reference = train_step(graphdef, state, batch, empty, empty_mask, optimizer=optimizer)

    # The batch is placed from host: resharding device arrays compiles a slicing program per shape.
    host_batch = jax.tree.map(np.asarray, batch)
    for name, axes in MESHES.items():
        mesh = sharding.make_mesh(**axes)
        placement = sharding.parameter_shardings(params, mesh)
        placed = nnx.state(sharding.shard_module(tiny_model(), mesh))  # the same parameters, sharded
        sharded_batch = jax.device_put(host_batch, sharding.batch_sharding(mesh))
        velocity = np.asarray(forward(placed, sharded_batch), np.float64)
        entry = {
            "forward_error": float(np.abs(velocity - reference_velocity).max() / np.abs(reference_velocity).max()),
            "param_fraction": stored_fraction(placed),
            "param_specs": specs(jax.tree.map(lambda x: x.sharding, placed)),
            "batch_fraction": stored_fraction(sharded_batch),
        }
        if name in TRAINED_MESHES:
            _, state = init_train_state(model, optimizer, jax.random.PRNGKey(0), mesh=mesh)
            state, metrics = train_step(
                graphdef, state, sharded_batch, empty, empty_mask, optimizer=optimizer, mesh=mesh
            )
            entry |= training_comparison(state, metrics, *reference, placement)
        results[name] = entry
    results["pipeline"] = sharded_sampling()
    results["splash"] = splash_under_mesh(batch, empty, empty_mask, optimizer, reference_velocity, reference)
    results["lora"] = lora_on_mesh()
    results["lora_training"] = lora_training_on_mesh(batch, empty, empty_mask, optimizer)
    return results


def randomize_adapters_(model: nnx.Module, seed: int, std: float = 0.2) -> nnx.Module:
    """Every adapter parameter random (a new adapter's B is zero: it would change nothing)."""
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


def adapted_tiny_model() -> NextDiT:
    """The tiny model with LoRA adapters on its attention and feed-forward, every adapter parameter random."""
    model = tiny_model()
    add_adapters(model, ["attention", "feed_forward"], 4, 8.0, dropout=0.1, key=jax.random.PRNGKey(1))
    return randomize_adapters_(model, seed=2, std=0.1)


def lora_training_on_mesh(batch, empty, empty_mask, optimizer) -> dict:
    """A LoRA training step (adapters trained, the rest frozen, dropout on) on fsdp=8 and on one device."""
    model = adapted_tiny_model()
    graphdef, state = init_train_state(model, optimizer, jax.random.PRNGKey(0))
    reference = train_step(graphdef, state, batch, empty, empty_mask, optimizer=optimizer, frozen=frozen_weights(model))
    mesh = sharding.make_mesh(fsdp=8)
    placed = sharding.shard_module(adapted_tiny_model(), mesh)
    frozen = frozen_weights(placed)
    frozen_layout = jax.tree.map(lambda x: x.sharding, frozen)
    graphdef, state = init_train_state(placed, optimizer, jax.random.PRNGKey(0), mesh=mesh)
    sharded_batch = jax.device_put(jax.tree.map(np.asarray, batch), sharding.batch_sharding(mesh))
    state, metrics = train_step(
        graphdef, state, sharded_batch, empty, empty_mask, optimizer=optimizer, mesh=mesh, frozen=frozen
    )
    placement = sharding.parameter_shardings(nnx.state(placed, nnx.LoRAParam), mesh)
    return training_comparison(state, metrics, *reference, placement) | {
        "frozen_fraction": stored_fraction(frozen),
        "frozen_unchanged_in_its_layout": laid_out_as(frozen, frozen_layout),
        "adapters_only": sorted({name for path, _ in nnx.to_flat_state(state.params) for name in path[-2:-1]}),
    }


def lora_on_mesh() -> dict:
    """A LoRA (diffusers' names) merged into the tiny model on an fsdp=4 x tensor=2 mesh and on one device."""
    params = nnx.to_pure_dict(nnx.state(tiny_model(), nnx.Param))
    rng = np.random.default_rng(0)
    tensors = {}
    adapted = {"attn1.to_k": ("attention", "to_k"), "feed_forward.linear_1": ("feed_forward", "gate")}
    for module, (group, name) in adapted.items():
        _, fan_in, fan_out = params["layers"][group][name]["kernel"].shape
        tensors[f"transformer.layers.1.{module}.lora_A.weight"] = rng.standard_normal((3, fan_in), dtype=np.float32)
        tensors[f"transformer.layers.1.{module}.lora_B.weight"] = rng.standard_normal((fan_out, 3), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/lora.safetensors"
        safetensors.numpy.save_file(tensors, path)
        one_device = nnx.state(merge_lora(tiny_model(), path), nnx.Param)
        placed = sharding.shard_module(tiny_model(), sharding.make_mesh(fsdp=4, tensor=2))
        layout = jax.tree.map(lambda x: x.sharding, nnx.state(placed, nnx.Param))
        merged = nnx.state(merge_lora(placed, path), nnx.Param)
    unmerged = dict(nnx.to_flat_state(nnx.state(tiny_model(), nnx.Param)))
    changed = [
        ".".join(path)
        for path, leaf in nnx.to_flat_state(one_device)
        if not np.array_equal(np.asarray(leaf.value), np.asarray(unmerged[path].value))
    ]
    return {
        "laid_out_as_before": laid_out_as(merged, layout),
        "max_difference": max_difference(host(merged), host(one_device)),
        "changed": sorted(changed),
    }


def splash_under_mesh(batch, empty, empty_mask, optimizer, reference_velocity, reference) -> dict:
    """Splash attention (Pallas, interpreted on CPU) under data=2 x fsdp=2 x tensor=2: the forward
    pass and one train step against XLA attention on one device, and how the kernel's operands are
    split (the manual computations of `jax.shard_map` in the lowered program)."""
    mesh = sharding.make_mesh(**MESHES["data2_fsdp2_tensor2"])
    model = sharding.shard_module(tiny_model(attention_backend="splash"), mesh)
    graphdef, params = nnx.split(model)
    placed = jax.device_put(jax.tree.map(np.asarray, batch), sharding.batch_sharding(mesh))
    t = jnp.linspace(0.05, 0.95, 8)

    @jax.jit
    def forward(params, batch):
        inputs = (batch.patches, batch.positions, batch.token_mask, t, batch.caption, batch.caption_mask)
        return predict_velocity(nnx.merge(graphdef, params), *inputs)

    with jax.set_mesh(mesh):
        lowered = forward.lower(params, placed).as_text()
        velocity = np.asarray(forward(params, placed), np.float64)
    _, state = init_train_state(model, optimizer, jax.random.PRNGKey(0), mesh=mesh)
    state, metrics = train_step(graphdef, state, placed, empty, empty_mask, optimizer=optimizer, mesh=mesh)
    return training_comparison(state, metrics, *reference, sharding.parameter_shardings(params, mesh)) | {
        "forward_error": float(np.abs(velocity - reference_velocity).max() / np.abs(reference_velocity).max()),
        "kernel_operand_splits": kernel_operand_splits(lowered),
    }


def kernel_operand_splits(lowered: str) -> list[str]:
    """The distinct layouts of the arrays that enter the program's manual computations (shard_map)."""
    inputs = re.findall(r"sdy.manual_computation\(.*?in_shardings=\[(.*?)\] out_shardings", lowered)
    return sorted({split for line in inputs for split in re.findall(r"<@\w+, (\[.*?\])>", line)})


def sharded_sampling() -> dict:
    """Latents of a pixel-space pipeline (tiny Next-DiT, the digits text stack) on 8 images with CFG,
    spread over meshes, against one device; and how many devices hold a piece of the images."""
    with tempfile.TemporaryDirectory() as folder:
        write_base_pipeline(folder, text_hidden=TINY.cross_attention_dim)
        pipe = LuminaPipeline.from_pretrained(folder, dtype="float32", transformer=tiny_model(), progress=False)
    prompts = [f"a handwritten digit {word}" for word in DIGIT_WORDS[:8]]
    options = dict(height=8, width=8, num_inference_steps=3, guidance_scale=4.0, seed=1, output_type="latent")
    reference = pipe(prompt=prompts, **options).images
    entry = {}
    for name in ("fsdp8", "data2_fsdp4"):
        pipe.shard(sharding.make_mesh(**MESHES[name]))
        latents = pipe(prompt=prompts, **options).images
        entry[name] = float(np.abs(latents - reference).max() / np.abs(reference).max())
    return entry


if __name__ == "__main__":
    print(json.dumps(main()))

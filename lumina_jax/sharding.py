"""Where arrays live on a device mesh: the mesh, the logical-axis rules, and the shardings they give.

Parameters name their axes (`lumina_jax.models.layers.logical_axes`); `LOGICAL_RULES` maps those
names onto the mesh axes ("data", "fsdp", "tensor"). Parameters are replicated over "data" and
sharded over "fsdp" (ZeRO-3 style) and "tensor" (Megatron style: attention heads and the FFN's
inner width); batches are split over "data" and "fsdp" together.
"""

import functools
import logging
import math
import os
from collections.abc import Callable

import jax
from flax import linen, nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# How much more of the parameters than their sharding rules ask for a device may hold before `report_replication`
# warns, as a fraction of that: MaxText's default `sharding_tolerance`.
REPLICATION_TOLERANCE = 0.02

# Logical axis -> mesh axis, in flax's rule format: rules apply in order, and a mesh axis already
# used by an array's earlier rule is not used again (a modulation kernel [cond, embed] shards
# embed only). For the released model (2304 wide, 32 query / 8 kv heads of 72, FFN 6144), every
# matrix is split over fsdp along its model-width side and over tensor along heads or FFN width.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),  # the scan axis: each step of the scan needs one whole layer
    ("patch", None),  # 16 or 32 wide: too small to split
    ("embed", "fsdp"),
    ("caption_embed", "fsdp"),
    ("cond", "fsdp"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
)


# The process count and index where no cluster tells JAX (plain machines), beside JAX_COORDINATOR_ADDRESS,
# which JAX reads itself.
PROCESS_VARIABLES = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def initialize_distributed() -> None:
    """Join a multi-host run when the environment describes one (a coordinator address, a SLURM job, a
    TPU VM of a pod slice, which lists its workers); before anything else asks JAX about devices.

    On a TPU pod slice and in a SLURM job JAX finds the process count and index itself; elsewhere
    JAX_NUM_PROCESSES and JAX_PROCESS_ID give them, beside JAX_COORDINATOR_ADDRESS."""
    if jax.distributed.is_initialized():
        return
    variables = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "MEGASCALE_COORDINATOR_ADDRESS")
    # TPU_WORKER_HOSTNAMES: "host1,host2,..." on a pod slice's VMs; elsewhere libtpu may fill it with a warning
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (any(k in os.environ for k in variables) or ("," in tpu_workers and " " not in tpu_workers)):
        return
    given = _process_variables()
    try:
        jax.distributed.initialize(**given)
    except ValueError as e:  # "Number of processes must be defined.": no cluster told JAX
        if len(given) == len(PROCESS_VARIABLES):
            raise
        raise ValueError(f"{e} Off a TPU pod slice or SLURM, set JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None


def _process_variables() -> dict[str, int]:
    """JAX_NUM_PROCESSES and JAX_PROCESS_ID, those set, as `jax.distributed.initialize`'s arguments."""
    given = {}
    for key, name in PROCESS_VARIABLES.items():
        if name in os.environ:
            if not os.environ[name].isdigit():
                raise ValueError(f"{name}={os.environ[name]!r} must be a whole number")
            given[key] = int(os.environ[name])
    if given.get("process_id", 0) >= given.get("num_processes", math.inf):
        raise ValueError(
            f"JAX_PROCESS_ID={given['process_id']} must be less than JAX_NUM_PROCESSES={given['num_processes']}"
        )
    return given


def make_mesh(data: int = 1, fsdp: int | None = None, tensor: int = 1, *, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; fsdp=None takes all the devices data and tensor leave.

    Over `devices` (default: all of JAX's; e.g. a TPU topology's, to compile only). A mesh smaller
    than the device count uses the first devices. Axes are Auto: the compiler propagates shardings
    through the model, whose layers carry no sharding annotations.
    """
    count = jax.device_count() if devices is None else len(devices)
    if fsdp is None:
        if data < 1 or tensor < 1 or count % (data * tensor):
            raise ValueError(f"data={data} x tensor={tensor} does not divide the {count} devices")
        fsdp = count // (data * tensor)
    sizes = (data, fsdp, tensor)
    size = data * fsdp * tensor
    if min(sizes) < 1 or count % size:
        raise ValueError(f"a mesh data={data} x fsdp={fsdp} x tensor={tensor} does not divide the {count} devices")
    return jax.make_mesh(
        sizes,
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=None if devices is None else list(devices)[:size],
    )


def mesh_partition_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The mesh layout of an array with logical axis names `logical` and this shape.

    A dimension that its mesh axis does not divide is replicated, and so is the second use of a
    repeated logical name (time_linear_2 is [cond, cond]).
    """
    names = [name if name not in logical[:i] else None for i, name in enumerate(logical)]
    sizes = dict(zip(names, shape))
    rules = []
    for name, axis in LOGICAL_RULES:
        if name not in sizes or (axis is not None and axis not in mesh.shape):
            continue
        if axis is not None and sizes[name] % mesh.shape[axis]:
            _log_replicated(name, sizes[name], axis, mesh.shape[axis])
            continue
        rules.append((name, axis))
    return linen.logical_to_mesh_axes(names, tuple(rules))


@functools.cache
def _log_replicated(name: str, size: int, axis: str, ways: int) -> None:
    """Once per case: a dimension left whole on every device costs memory the user may not expect."""
    logger.info(f"a '{name}' dimension of {size} is replicated: the mesh's '{axis}' axis ({ways}) does not divide it")


def parameter_shardings(module_or_tree, mesh: Mesh):
    """A NamedSharding for every array of a module or pytree, from its variables' logical axis names.

    Takes a module, its state, or any pytree holding its variables (an optimizer state, a training
    state): arrays that are not named variables (counters, keys) are replicated.
    """
    tree = nnx.state(module_or_tree) if isinstance(module_or_tree, nnx.Module) else module_or_tree
    # Without rules in context nnx reports the logical names; an enclosing context would map them already.
    with nnx.logical_axis_rules(()):
        logical = nnx.get_partition_spec(tree)
    return jax.tree.map(
        lambda spec, array: NamedSharding(mesh, mesh_partition_spec(spec, array.shape, mesh)),
        logical,
        tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def report_replication(tree, mesh: Mesh, tolerance: float = REPLICATION_TOLERANCE) -> float:
    """How much more of `tree` (a module's state, or a pytree holding its variables) each device holds, laid
    out by `parameter_shardings`, than its logical axis names ask for (each named dimension split over its
    rule's mesh axis), as a fraction of that: the replication that sharding could not avoid, where a mesh
    axis does not divide a dimension (`mesh_partition_spec`). Like MaxText's `assert_params_sufficiently_
    sharded`, above `tolerance` it warns, with the share and the largest arrays left whole: on a pod, a
    multiple of memory. What is meant whole (the VAE's convolutions, counters: no rule maps their names onto
    the mesh) and data replicas are as asked."""
    rules = dict(LOGICAL_RULES)
    with nnx.logical_axis_rules(()):
        logical = nnx.get_partition_spec(tree)
    specs = jax.tree.leaves_with_path(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    held = {}  # name -> (bytes each device holds, bytes it would hold as the names ask)
    for (path, spec), array in zip(specs, jax.tree.leaves(tree)):
        names = {name for i, name in enumerate(spec) if name not in spec[:i]}  # a name splits once
        ways = math.prod(mesh.shape[axis] for axis in {rules.get(name) for name in names} & set(mesh.shape))
        laid_out = NamedSharding(mesh, mesh_partition_spec(spec, array.shape, mesh))
        nbytes = math.prod(array.shape) * array.dtype.itemsize
        held[jax.tree_util.keystr(path)] = (
            math.prod(laid_out.shard_shape(array.shape)) * array.dtype.itemsize,
            nbytes / ways,
        )
    share = sum(h for h, _ in held.values()) / max(sum(asked for _, asked in held.values()), 1) - 1
    if share > tolerance:
        extra = {name: h - asked for name, (h, asked) in held.items()}
        largest = sorted(extra, key=extra.get, reverse=True)[:3]
        logger.warning(
            f"each device holds {share:.0%} more parameters than their sharding rules ask for on this mesh "
            f"({dict(mesh.shape)}; tolerance {tolerance:.0%}): dimensions the mesh does not divide are replicated; "
            "largest: " + ", ".join(f"{name} ({extra[name] / 2**20:.2f} MiB extra)" for name in largest)
        )
    return share


def abstract_module(make_module: Callable[[], nnx.Module]) -> nnx.Module:
    """`nnx.eval_shape(make_module)`, outside any current mesh (`jax.set_mesh`): the parameters' logical
    axis names are not mesh axes until `parameter_shardings` maps them."""
    with jax.sharding.use_abstract_mesh(AbstractMesh((), ())):
        return nnx.eval_shape(make_module)


def create_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """A new module whose variables are created straight into their shardings on the mesh: one
    jitted initialisation with out_shardings, so no device ever holds more than its share."""
    graphdef, abstract = nnx.split(abstract_module(make_module))
    shardings = parameter_shardings(abstract, mesh)
    report_replication(abstract, mesh)
    state = jax.jit(lambda: nnx.state(make_module()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place the module's parameters on the mesh, in place; returns the module. An abstract module
    (`nnx.eval_shape`) gets ShapeDtypeStructs that carry the shardings, to lower programs with."""
    state = nnx.state(module)

    def place(value, sharding):
        if isinstance(value, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
        return jax.device_put(value, sharding)

    shardings = parameter_shardings(state, mesh)
    report_replication(state, mesh)
    nnx.update(module, jax.tree.map(place, state, shardings))
    return module


def attention_partition(
    axis_sizes: dict[str, int], batch: int, heads: int, kv_heads: int
) -> tuple[PartitionSpec, PartitionSpec]:
    """How a fused attention kernel's operands split over a mesh of these axis sizes: examples over
    the batch axes, heads over "tensor" (query and kv heads alike, so each device keeps its query
    heads' kv heads), each only where it divides evenly, else with a warning: each device then does the
    work of all of them. Specs of [B, L, heads, D] and of [B, L]."""
    batch_axes = tuple(axis for axis in BATCH_AXES if axis_sizes.get(axis, 1) > 1)
    rows = math.prod(axis_sizes[axis] for axis in batch_axes)
    examples = batch_axes if batch_axes and batch % rows == 0 else None
    if batch_axes and examples is None:
        _warn_replicated("attention", f"a batch of {batch}", rows)
    tensor = axis_sizes.get("tensor", 1)
    split_heads = "tensor" if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None
    if tensor > 1 and split_heads is None:
        _warn_replicated("attention", f"{heads} query and {kv_heads} kv heads", tensor)
    return PartitionSpec(examples, None, split_heads, None), PartitionSpec(examples, None)


@functools.cache
def _warn_replicated(where: str, what: str, ways: int) -> None:
    """Once per case (attention is traced once per layer, a pipeline's rows placed once per call)."""
    logger.warning(f"{where}: {what} cannot be split {ways} ways: every one of those {ways} devices computes all")


def rows_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """`rows` examples over the mesh's batch axes when they divide evenly; else a copy on every device, with
    a warning: each of those devices then holds and computes all of them."""
    ways = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if rows % ways == 0:
        return batch_sharding(mesh)
    _warn_replicated("batch rows", f"a batch of {rows}", ways)
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; a pytree prefix for a whole batch."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))

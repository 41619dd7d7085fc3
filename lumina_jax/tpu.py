"""Will it fit? Cloud TPU slices, and per-chip memory plans from the real TPU compiler, without a TPU.

libtpu (`pip install -e ".[tpu]"`) carries XLA's TPU compiler, and JAX hands it devices of any
slice's topology on a machine that has no TPU (`jax.experimental.topologies`). A program lowered
with arguments laid out on those devices compiles exactly as it would on the slice; the compiled
program's `memory_analysis()` gives its bytes per chip. A program that needs more HBM than a chip
has is sometimes refused at compile time and sometimes not, so a plan compares the figures itself:
every model's weights stay resident, and the largest program's other bytes come on top of them.
"""

import dataclasses
import importlib.util
import math
import os
import re

import jax
import numpy as np

GiB = 2**30


# What libtpu reads from a TPU VM's metadata server: one host, unless the environment says otherwise.
SINGLE_HOST = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}


def describe_single_host() -> None:
    """Off a TPU VM, tell libtpu this machine is one host; call before JAX starts its backends.

    With libtpu installed (the `tpu` and `test` extras), JAX loads it at its first device query to
    look for TPUs, and `compile_devices` loads it to compile. Told not to ask a metadata server
    (TPU_SKIP_MDS_QUERY, which `import jax` sets on a machine without TPU chips), libtpu finds no
    host description and prints an error block that looks like a failure, though nothing failed.
    A TPU VM (no TPU_SKIP_MDS_QUERY) and a host description the user gave are left alone."""
    if "TPU_SKIP_MDS_QUERY" in os.environ and not any(name in os.environ for name in SINGLE_HOST):
        os.environ.update(SINGLE_HOST)


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # of JAX's topology names
    device_kind: str  # what jax.Device.device_kind says
    hbm_bytes: int  # per chip: what XLA lets a program use (its RESOURCE_EXHAUSTED message names it)
    megacore: bool  # two TensorCores act as one device; slice names count cores, not chips


# The HBM figures are those the compiler states (libtpu 0.0.42.1): 16, 32, 95 and 32 GiB chips less a reserve.
GENERATIONS = {
    "v4": Generation("v4", "TPU v4", int(30.75 * GiB), True),
    "v5e": Generation("v5e", "TPU v5 lite", int(15.75 * GiB), False),
    "v5p": Generation("v5p", "TPU v5", int(95.74 * GiB), True),
    "v6e": Generation("v6e", "TPU v6 lite", int(31.25 * GiB), False),
}
# Chip grids of the slices Cloud TPU sells: 2D for v5e and v6e, 3D for v4 and v5p.
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
CHIPS_PER_HOST = (2, 2, 1)  # the usual host of four chips; a one-chip slice is a host of one


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # as Cloud TPU sells it: "v5e-8", "v5p-128"
    generation: Generation
    grid: str  # chips along each axis: "2x4", "4x4x4"

    @property
    def topology(self) -> str:
        """JAX's topology name, e.g. "v5e:2x4"."""
        return f"{self.generation.prefix}:{self.grid}"

    @property
    def chips(self) -> int:
        return math.prod(int(n) for n in self.grid.split("x"))

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes


def slice_names() -> list[str]:
    """Every slice name `tpu_slice` knows."""
    names = []
    for key, generation in GENERATIONS.items():
        grids = GRIDS_3D if generation.megacore else GRIDS_2D
        names += [f"{key}-{chips * (2 if generation.megacore else 1)}" for chips in grids]
    return names


def tpu_slice(name: str) -> TpuSlice:
    """A slice by its Cloud TPU name ("v5e-8": 8 chips; "v5p-8", "v4-8": 8 TensorCores, 4 chips) or by
    JAX's topology name ("v5e:2x4")."""
    if match := re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name):
        generation = GENERATIONS[match[1]]
        count = int(match[2])
        chips = count // 2 if generation.megacore else count
        grid = (GRIDS_3D if generation.megacore else GRIDS_2D).get(chips)
        if grid is not None and (not generation.megacore or count % 2 == 0):
            return TpuSlice(name, generation, grid)
    elif match := re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+x\d+(?:x\d+)?)", name):
        generation = GENERATIONS[match[1]]
        if match[2].count("x") == (2 if generation.megacore else 1):
            return TpuSlice(name, generation, match[2])
    raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(slice_names())}, or a topology such as v5e:2x4")


def compile_devices(tpu: TpuSlice) -> list[jax.Device]:
    """The slice's devices for compiling only (no TPU needed), one per chip."""
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError('compiling for a TPU needs libtpu, the TPU compiler: pip install -e ".[tpu]"')
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this is not a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling claims no chip: processes may share libtpu
    from jax.experimental import topologies

    per_host = (1, 1, 1) if tpu.chips == 1 else CHIPS_PER_HOST
    description = topologies.get_topology_desc(
        platform="tpu",
        topology_name=tpu.topology,
        chip_config_name="megacore" if tpu.generation.megacore else "default",
        chips_per_host_bounds=per_host,
    )
    return description.devices


def per_chip_bytes(tree) -> int:
    """Bytes of a pytree of arrays (or ShapeDtypeStructs) on its most loaded device: each leaf's
    shard, as its sharding splits it (a leaf without one counts whole)."""

    def shard_bytes(leaf) -> int:
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        return math.prod(shape) * np.dtype(leaf.dtype).itemsize

    return sum(shard_bytes(leaf) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """One compiled program's bytes per chip, as the compiler allots them."""

    name: str
    arguments: int
    outputs: int
    aliased: int  # outputs written over donated arguments
    temporaries: int
    code: int
    weights: int  # of the arguments: model weights
    flops: float | None  # per chip, from the compiler's cost analysis
    refused: str | None = None  # the compiler's reason, when it would not compile the program for lack of HBM
    model: str | None = None  # whose weights those are
    host_temporaries: int = 0  # in the host's pinned memory: what a remat policy offloads (not HBM)

    @property
    def transient(self) -> int:
        """What the program needs beyond the resident weights while it runs."""
        return self.arguments - self.weights + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def host_transfers(self) -> int:
        """Bytes copied between the host and the chip per run, an estimate from the compiler's host temporaries:
        each offloaded byte goes out once (forward pass) and comes back once (backward pass)."""
        return 2 * self.host_temporaries


def compile_program(
    name: str, lowered: jax.stages.Lowered, weights: int = 0, model: str | None = None
) -> ProgramMemory:
    """Compile a lowered program and read its per-chip memory; `weights` says how many argument
    bytes are resident model weights. A program the compiler refuses for lack of HBM comes back
    with its reason in `refused` and the temporaries the message names."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        required = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
        temporaries = int(float(required[1]) * 1024 ** "KMGT".index(required[2]) * 1024) if required else 0
        reason = re.search(r"[^:]*\([\d.]+[KMGT]\)[^:(]*exceeds available HBM \([\d.]+[KMGT]\)", message)
        return ProgramMemory(
            name,
            weights,
            0,
            0,
            temporaries,
            0,
            weights,
            None,
            refused=reason[0].strip() if reason else message.splitlines()[0],
            model=model,
        )
    memory = compiled.memory_analysis()
    weights = min(weights, memory.argument_size_in_bytes)  # the program may read only part of a model (a VAE's decoder)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return ProgramMemory(
        name,
        arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        code=memory.generated_code_size_in_bytes,
        weights=weights,
        flops=(cost or {}).get("flops"),
        model=model,
        host_temporaries=memory.host_temp_size_in_bytes,
    )


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Programs that run one after another; the `resident` models' weights stay on the chips
    throughout, any other model's only while a program that reads them runs."""

    tpu: TpuSlice
    resident: dict[str, int]  # per chip: model name -> weight bytes
    programs: list[ProgramMemory]

    def beside(self, other: "MemoryPlan") -> "MemoryPlan":
        """This plan's programs and then another's on the same chips, the weights of both resident throughout."""
        return dataclasses.replace(
            self, resident={**self.resident, **other.resident}, programs=[*self.programs, *other.programs]
        )

    def needs(self, program: ProgramMemory) -> int:
        """Bytes per chip while the program runs."""
        visiting = program.weights if program.model not in self.resident else 0
        return sum(self.resident.values()) + visiting + program.transient

    @property
    def largest(self) -> ProgramMemory:
        return max(self.programs, key=self.needs)

    @property
    def peak_bytes(self) -> int:
        return self.needs(self.largest)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.tpu.hbm_bytes and not any(p.refused for p in self.programs)

    def summary(self) -> str:
        """The figures as a table, and the verdict."""
        gb = lambda n: f"{n / GiB:7.2f}"  # noqa: E731
        columns = "".join(f"{name:>8}" for name in ("weights", "args", "outputs", "temps", "code", "needs"))
        heading = f"{self.tpu.name} ({self.tpu.topology}, {self.tpu.generation.device_kind})"
        lines = [
            f"{heading}: {self.tpu.hbm_bytes / GiB:.2f} GiB of HBM per chip",
            "",
            "per chip, GiB".ljust(28) + columns,
        ]
        for p in self.programs:
            lines.append(
                f"{p.name:<28}{gb(p.weights)} {gb(p.arguments - p.weights)} {gb(p.outputs)} "
                f"{gb(p.temporaries)} {gb(p.code)} {gb(self.needs(p))}"
            )
        resident = ", ".join(f"{name} {n / GiB:.2f}" for name, n in self.resident.items())
        lines += [
            "",
            f"resident weights: {resident} GiB",
            f"peak: {self.peak_bytes / GiB:.2f} GiB (while {self.largest.name} runs) "
            f"of {self.tpu.hbm_bytes / GiB:.2f} GiB",
        ]
        lines += [
            f"{p.name}: {p.host_temporaries / GiB:.2f} GiB per chip offloaded to the host's pinned memory, "
            f"about {p.host_transfers / GiB:.2f} GiB copied between host and chip a run (out and back once)"
            for p in self.programs
            if p.host_temporaries
        ]
        lines += [f"{p.name}: refused by the compiler: {p.refused}" for p in self.programs if p.refused]
        if self.fits:
            lines.append(f"fits, {(self.tpu.hbm_bytes - self.peak_bytes) / GiB:.2f} GiB to spare")
        else:
            lines.append(
                f"does not fit: {self.largest.name} needs "
                f"{(self.peak_bytes - self.tpu.hbm_bytes) / GiB:.2f} GiB more than a chip has"
            )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "slice": self.tpu.name,
            "topology": self.tpu.topology,
            "chips": self.tpu.chips,
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "hbm_bytes": self.tpu.hbm_bytes,
            "resident_bytes": self.resident,
            "programs": [
                {
                    **dataclasses.asdict(p),
                    "transient": p.transient,
                    "host_transfers": p.host_transfers,
                    "needs": self.needs(p),
                }
                for p in self.programs
            ],
        }


def plan_programs(
    tpu: TpuSlice,
    programs: dict[str, tuple[jax.stages.Lowered, object]],
    models: dict[str, object],
    offloaded: tuple[str, ...] = (),
    log=None,
) -> MemoryPlan:
    """Compile each lowered program (name -> (lowered, the model whose weights it reads, or None))
    for the slice. `models` (name -> module) stay resident, but for those `offloaded` to the host."""
    from flax import nnx

    weights = lambda module: 0 if module is None else per_chip_bytes(nnx.state(module))  # noqa: E731
    name_of = {id(module): name for name, module in models.items()}
    compiled = []
    for name, (lowered, module) in programs.items():
        if log:
            log(f"compiling {name} for {tpu.name}")
        compiled.append(compile_program(name, lowered, weights(module), name_of.get(id(module))))
    resident = {name: weights(module) for name, module in models.items() if name not in offloaded}
    return MemoryPlan(tpu, resident, compiled)

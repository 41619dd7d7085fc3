"""Loads onto a mesh of 8 simulated CPU devices: what each device holds while weights load, and the
loaded values against a one-device load; prints the measurements as JSON.

tests/test_load_on_mesh.py runs it in a fresh process, because the device count is fixed when JAX
starts: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/load_checks.py
"""

import collections
import json
import math
import sys
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from reference import TINY_NEXT_DIT, random_pipeline

from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.sharding import make_mesh
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.loop import initial_transformer
from lumina_jax.weights.convert import convert_pipeline
from lumina_jax.weights.nextdit import load_transformer

CORPUS = ["a red cube", "a blue sphere on a table"]


def device_bytes() -> collections.Counter:
    """Bytes of live arrays on each device: each array counts its shard on every device it lives on."""
    held = collections.Counter()
    for array in jax.live_arrays():
        shard = math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize
        for device in array.sharding.device_set:
            held[device] += shard
    return held


class PeakPerDevice:
    """The most any one device held, above what it held before, while the block ran (sampled)."""

    def __enter__(self):
        self.before, self.peak, self._stop = device_bytes(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.0005):
            self._sample()

    def _sample(self):
        held = device_bytes()
        self.peak = max(self.peak, max(held[d] - self.before[d] for d in held) if held else 0)

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self._sample()


def footprint(modules) -> dict[str, int]:
    """A set of modules' bytes in all, and the most that any one device holds of them."""
    arrays = [a for module in modules for a in jax.tree.leaves(nnx.state(module))]
    held = collections.Counter()
    for array in arrays:
        for shard in array.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return {"total": sum(a.nbytes for a in arrays), "share": max(held.values())}


def largest(modules) -> int:
    return max(a.nbytes for module in modules for a in jax.tree.leaves(nnx.state(module)))


def same_values(a: nnx.Module, b: nnx.Module) -> bool:
    left, right = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    return len(left) == len(right) and all(np.array_equal(x, y) for x, y in zip(left, right))


def measure(load, reference_modules) -> dict:
    """Load under a peak watch; the peak against the loaded modules' share, and values against `reference_modules`."""
    with PeakPerDevice() as watch:
        modules = load()
    devices = {d for module in modules for a in jax.tree.leaves(nnx.state(module)) for d in a.sharding.device_set}
    return {
        "peak": watch.peak,
        **footprint(modules),
        "largest": largest(modules),
        "devices": len(devices),
        "equal": all(same_values(a, b) for a, b in zip(modules, reference_modules)),
    }


def components(pipe: LuminaPipeline) -> list[nnx.Module]:
    return [pipe.transformer, pipe.text_encoder, pipe.vae]


def main() -> dict:
    mesh = make_mesh(fsdp=8)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        diffusers_folder, converted = Path(tmp) / "diffusers", Path(tmp) / "converted"
        random_pipeline(diffusers_folder, CORPUS)
        convert_pipeline(diffusers_folder, converted, progress=False)
        one_device = components(LuminaPipeline.from_pretrained(diffusers_folder, "float32", progress=False))
        for name, folder in (("pipeline_safetensors", diffusers_folder), ("pipeline_orbax", converted)):
            load = lambda: components(  # noqa: E731
                LuminaPipeline.from_pretrained(folder, "float32", mesh=mesh, progress=False)
            )
            results[name] = measure(load, one_device)

        # the control: loading whole onto one device, then spreading, as loaders did before
        results["control_one_device_then_shard"] = measure(
            lambda: components(LuminaPipeline.from_pretrained(diffusers_folder, "float32", progress=False).shard(mesh)),
            one_device,
        )

        def under_current_mesh():
            with jax.set_mesh(mesh):
                return [load_transformer(diffusers_folder, "float32", progress=False)]

        results["transformer_current_mesh"] = measure(under_current_mesh, one_device[:1])

        transformer = NextDiTConfig(sample_size=16, **TINY_NEXT_DIT)
        config = TrainConfig(workdir=tmp, pipeline="", data="", cache="", init="scratch", transformer=transformer)
        one_device_init = initial_transformer(config, make_mesh(fsdp=1))
        results["training_init"] = measure(lambda: [initial_transformer(config, mesh)], [one_device_init])
    return results


def distributed(rank: int, port: int) -> dict:
    """One of 2 processes (2 devices each) loading the original fixture onto a mesh over all 4 devices:
    the place and sum of each shard this process holds, to compare with a one-process load."""
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=rank)
    mesh = make_mesh(fsdp=4)
    loaded = load_transformer(
        Path(__file__).parent / "fixtures" / "lumina_next_original_tiny", mesh=mesh, progress=False
    )
    shards = [
        {
            "path": jax.tree_util.keystr(path),
            "box": [s.indices(dim)[:2] for s, dim in zip(shard.index, array.shape)],
            "sum": float(np.asarray(shard.data, np.float64).sum()),
        }
        for path, array in jax.tree_util.tree_leaves_with_path(nnx.state(loaded))
        for shard in array.addressable_shards
    ]
    jax.distributed.shutdown()
    return {"devices": len(mesh.devices.flat), "addressable": len(jax.local_devices()), "shards": shards}


if __name__ == "__main__":
    if sys.argv[1:2] == ["distributed"]:
        print(json.dumps(distributed(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(main()))

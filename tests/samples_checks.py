"""Samples while training drawn on a training mesh against one device; prints the measurements as JSON.

tests/test_samples.py runs it in a fresh process, because the device count is fixed when JAX starts:
XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/samples_checks.py
"""

import dataclasses
import json
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image
from reference import digits_pipeline_with_vae

from lumina_jax import sharding
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.training import digits
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.loop import make_run_optimizer, transformer_factory
from lumina_jax.training.samples import SampleDrawer
from lumina_jax.training.step import init_train_state

# Heads, kv heads and widths divide by 2: the tensor axis splits every matrix.
TINY = NextDiTConfig(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_kv_heads=2,
    multiple_of=32,
    learn_sigma=False,
    cross_attention_dim=32,
)
MESHES = {"data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2), "data2_fsdp4": dict(data=2, fsdp=4)}
PROMPTS = ["a handwritten digit three", "a handwritten digit seven", "a handwritten digit nine"]


def ema_on(mesh, config):
    """The EMA of a fresh training state on the mesh, as `train` holds it (the same weights on every mesh)."""
    model = sharding.create_sharded(transformer_factory(config), mesh)
    return init_train_state(model, make_run_optimizer(config), jax.random.PRNGKey(0), mesh=mesh)


def draw(config: TrainConfig, mesh, workdir: Path) -> dict:
    """The drawer's PNGs (as pixels), the float images of a call of eight prompts through its pipeline, and the
    EMA copy it samples with."""
    graphdef, state = ema_on(mesh, config)
    drawer = SampleDrawer(config, workdir)
    files = drawer.draw(2, graphdef, state.ema_params)
    pipe = drawer.pipeline(graphdef, state.ema_params)
    images = pipe(
        prompt=[f"a handwritten digit {word}" for word in digits.DIGIT_WORDS[:8]],
        seed=[0] * 8,
        num_inference_steps=config.sample_steps,
        guidance_scale=config.sample_guidance,
        output_type="np",
    ).images
    leaves, ema = jax.tree.leaves(nnx.state(pipe.transformer)), jax.tree.leaves(state.ema_params)
    return {
        "files": [f.name for f in files],
        "written": sorted(p.name for p in files[0].parent.iterdir()),
        "pixels": [np.asarray(Image.open(f), np.int32) for f in files],
        "images": images,
        # what device 0 holds of the copy, over the whole copy
        "device_share": sum(x.addressable_shards[0].data.nbytes for x in leaves) / sum(x.nbytes for x in leaves),
        "dtypes": sorted({str(x.dtype) for x in leaves}),
        "as_the_ema": all(w.sharding == e.sharding for w, e in zip(leaves, ema)),
    }


def main() -> dict:
    results = {"devices": jax.device_count()}
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        config = TrainConfig(
            workdir="unused",
            pipeline=str(digits_pipeline_with_vae(root / "base", TINY.cross_attention_dim)),
            data="unused",
            cache="unused",
            init="scratch",
            transformer=TINY,
            image_size=32,
            compute_dtype="float32",
            sample_every=2,
            sample_prompts=PROMPTS,
            sample_steps=2,
            sample_guidance=2.0,
        )
        reference = draw(config, sharding.make_mesh(devices=jax.devices()[:1]), root / "one")
        for name, axes in MESHES.items():
            drawn = draw(config, sharding.make_mesh(**axes), root / name)
            scale = np.abs(reference["images"]).max()
            results[name] = {
                "files": drawn["files"],
                "written": drawn["written"],
                "image_error": float(np.abs(drawn["images"] - reference["images"]).max() / scale),
                "pixel_error": max(int(np.abs(a - b).max()) for a, b in zip(drawn["pixels"], reference["pixels"])),
                "device_share": drawn["device_share"],
                "as_the_ema": drawn["as_the_ema"],
                "dtypes": drawn["dtypes"],
            }
        bfloat16 = dataclasses.replace(config, compute_dtype="bfloat16")
        graphdef, state = ema_on(sharding.make_mesh(**MESHES["data2_fsdp4"]), bfloat16)
        weights = SampleDrawer(bfloat16, root / "bf16").compute_weights(state.ema_params)
        leaves = jax.tree.leaves(weights)
        results["bfloat16"] = {
            "dtypes": sorted({str(x.dtype) for x in leaves}),
            "device_bytes": sum(x.addressable_shards[0].data.nbytes for x in leaves),
            "full_float32_bytes": sum(x.nbytes for x in jax.tree.leaves(state.ema_params)),
        }
    return results


if __name__ == "__main__":
    print(json.dumps(main()))

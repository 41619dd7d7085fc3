"""Time per image of the whole pipeline at 256x256 on this CPU: ours against diffusers' LuminaPipeline,
with the same tiny random components (tests/reference.py), 30 steps, CFG, alternating after warm-up.

    python benchmarks/pipeline_cpu.py [--steps 30] [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from reference import random_pipeline, relative_error  # noqa: E402

from lumina_jax.pipeline import LuminaPipeline  # noqa: E402

PROMPT = "an astronaut riding a horse on the moon"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    reference = random_pipeline(folder, corpus=[PROMPT])
    ours = LuminaPipeline.from_pretrained(folder, dtype="float32", progress=False)
    latents = np.random.default_rng(0).standard_normal((1, 4, 32, 32), dtype=np.float32)
    settings = dict(prompt=PROMPT, height=256, width=256, num_inference_steps=args.steps, guidance_scale=4.0)

    def theirs():
        return reference(latents=torch.from_numpy(latents), output_type="np", **settings).images

    def mine():
        return ours(latents=latents, output_type="np", **settings).images

    start = time.perf_counter()
    first = mine()
    cold = time.perf_counter() - start
    difference = float(np.abs(first - theirs()).max())
    times = {"diffusers": [], "ours": []}
    for _ in range(args.repeats):
        for name, fn in (("diffusers", theirs), ("ours", mine)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(t) for name, t in times.items()}
    result.update(speedup=result["diffusers"] / result["ours"], first_image_with_compile_s=cold,
                  max_pixel_difference=difference, torch_threads=torch.get_num_threads())  # fmt: skip
    latent_error = relative_error(
        ours(latents=latents, output_type="latent", **settings).images,
        reference(latents=torch.from_numpy(latents), output_type="latent", **settings).images.numpy(),
    )
    result["latent_relative_error"] = latent_error
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

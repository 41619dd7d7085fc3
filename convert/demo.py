"""python -m convert.demo [OUT]: the converter end to end on a small Next-DiT this command builds.

The quickest check of the converter on a fresh machine, with no download: random weights are
written in diffusers' layout, converted to our Orbax format, loaded back and run.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from lumina_jax import NextDiT, NextDiTConfig, load_transformer
from lumina_jax.cli.convert import main as convert_main
from lumina_jax.weights.nextdit import save_diffusers

DEMO = NextDiTConfig(
    hidden_size=256,
    num_layers=4,
    num_attention_heads=8,
    num_kv_heads=2,
    multiple_of=64,
    cross_attention_dim=128,
    sample_size=32,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="out/demo", help="folder for the demo checkpoints")
    args = parser.parse_args(argv)
    out = Path(args.out)

    model = NextDiT(DEMO, rngs=nnx.Rngs(0))
    save_diffusers(model, out / "diffusers", overwrite=True)
    print(
        f"built a {sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))):,}-parameter Next-DiT "
        f"in diffusers' layout: {out / 'diffusers'}"
    )
    if convert_main([str(out / "diffusers"), str(out / "converted"), "--overwrite"]):
        return 1

    converted = load_transformer(out / "converted", progress=False)
    keys = jax.random.split(jax.random.key(0), 2)
    latents = jax.random.normal(keys[0], (2, 4, 32, 48))
    caption = jax.random.normal(keys[1], (2, 16, DEMO.cross_attention_dim))
    mask = jnp.arange(16)[None] < jnp.array([[16], [7]])
    forward = nnx.jit(lambda m, *a: m(*a, base_sequence_length=DEMO.base_sequence_length))
    forward(converted, latents, jnp.array([0.2, 0.8]), caption, mask).block_until_ready()
    start = time.perf_counter()
    velocity = forward(converted, latents, jnp.array([0.2, 0.8]), caption, mask).block_until_ready()
    print(
        f"forward of the converted model on latents {latents.shape}: output {velocity.shape}, "
        f"{(time.perf_counter() - start) * 1e3:.1f} ms on {jax.devices()[0].platform}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

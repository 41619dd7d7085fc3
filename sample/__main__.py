"""python -m sample --model PATH --prompt "..." [options]: text to image with lumina-jax."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from PIL import PngImagePlugin
from tqdm.auto import tqdm

from lumina_jax import sampling
from sample import DEFAULT_MODEL

CACHE = Path(os.environ.get("LUMINA_JAX_CACHE", Path.home() / ".cache" / "lumina_jax")) / "xla"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sample", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="pipeline folder: diffusers layout or from `python -m convert` (default: the small "
                        "digits model shipped with lumina-jax, 32x32 px)")  # fmt: skip
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="what to draw")
    prompts.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale; <= 1 turns it off")
    parser.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--solver", choices=sampling.SOLVERS, default="euler")
    parser.add_argument("--schedule", choices=sampling.SCHEDULES, default="diffusers")
    parser.add_argument("--scaling-watershed", type=float, default=1.0)
    parser.add_argument(
        "--context-drop",
        type=int,
        default=1,
        help="Context Drop window: 2 merges 2x2 image keys/values (faster at 2048 px, approximate)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: bfloat16 on GPUs and TPUs, float32 on CPUs)")  # fmt: skip
    parser.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default=None,
                        help="the VAE's dtype (default: float32 where its config asks, as the SDXL VAE's does; "
                             "bfloat16 halves the decoder's memory)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNGs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import jax  # after argument parsing, so --help is instant

    # Compiled programs persist across runs: a second start skips compilation.
    jax.config.update("jax_compilation_cache_dir", str(CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from lumina_jax.pipeline import LuminaPipeline

    args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")

    if args.prompts_file:
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            print(f"error: {args.prompts_file} has no prompts", file=sys.stderr)
            return 2
    else:
        prompts = [args.prompt]
    start = time.perf_counter()
    try:
        pipe = LuminaPipeline.from_pretrained(args.model, dtype=args.dtype, vae_dtype=args.vae_dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    solver=args.solver, schedule=args.schedule, scaling_watershed=args.scaling_watershed,
                    context_drop=args.context_drop)  # fmt: skip
    written, times = [], []
    jobs = [(p, i) for p, prompt in enumerate(prompts) for i in range(args.num_images)]
    for p, i in tqdm(jobs, desc="sampling", unit="image"):
        seed = args.seed + i
        start = time.perf_counter()
        try:
            image = pipe(prompt=prompts[p], negative_prompt=args.negative_prompt, seed=seed, **settings).images[0]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        times.append(time.perf_counter() - start)
        info = PngImagePlugin.PngInfo()
        metadata = {"prompt": prompts[p], "negative_prompt": args.negative_prompt or "", "seed": seed,
                    "model": str(args.model), "dtype": args.dtype, **settings}  # fmt: skip
        info.add_text("parameters", json.dumps(metadata))
        for key, value in metadata.items():
            info.add_text(key, str(value))
        path = args.out / f"{p:03d}_{seed}.png"
        image.save(path, pnginfo=info)
        written.append(path)
    first, rest = times[0], times[1:]
    per_image = f"{first:.2f} s for the first image (with compilation, unless cached)" + (
        f", {sum(rest) / len(rest):.2f} s per image after" if rest else ""
    )
    print(f"wrote {len(written)} image(s) to {args.out}/: {per_image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m sample --model PATH_OR_HUB_ID --prompt "..." [options]: text to image with lumina-jax."""

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
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="pipeline folder (diffusers layout or from `python -m convert`) or a hub id, e.g. "
                        "Alpha-VLLM/Lumina-Next-SFT-diffusers (default: the small "
                        "digits model shipped with lumina-jax, 32x32 px); with --compile-only, a folder of "
                        "config files is enough, or a released name: lumina-next-sft")  # fmt: skip
    parser.add_argument("--revision", help="hub id: the branch, tag or commit to download (default: main)")
    prompts = parser.add_mutually_exclusive_group()
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
    parser.add_argument("--offload-text-encoder", action="store_true",
                        help="keep the text encoder's weights in host memory except while it encodes: frees their "
                             "accelerator memory (4.7 GiB for Gemma-2B) for the sampler and the decoder")  # fmt: skip
    parser.add_argument("--mesh", type=parse_mesh, default=None, metavar="data=D,fsdp=F,tensor=T",
                        help="run on a device mesh: the transformer's weights split over fsdp and tensor, the images "
                             "over data and fsdp (default: one device)")  # fmt: skip
    plan = parser.add_argument_group("compile only: will it fit on a Cloud TPU (no TPU and no weights needed)")
    plan.add_argument("--compile-only", action="store_true",
                      help="compile every program of the run for --topology with the TPU compiler (pip install -e "
                           "'.[tpu]') and print each one's memory per chip; exit 1 if it does not fit")  # fmt: skip
    plan.add_argument("--topology", help="the TPU slice: v5e-1, v5e-8, v6e-8, v5p-8, v4-8, ... or a JAX topology name")
    plan.add_argument("--caption-length", type=int, default=256, help="caption tokens to plan for (default: the most)")
    plan.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.compile_only and not args.topology:
        parser.error("--compile-only needs --topology")
    if not args.compile_only and not (args.prompt or args.prompts_file):
        parser.error("one of --prompt or --prompts-file is required")
    return args


def parse_mesh(text: str) -> dict[str, int]:
    """A --mesh value, "data=2,fsdp=4,tensor=1", as mesh axis sizes; axes left out are 1."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected data=N, fsdp=N or tensor=N with N >= 1")
        sizes[name] = int(value)
    return sizes


def compile_only(args: argparse.Namespace) -> int:
    """Compile the run's programs for a TPU slice without weights, print the per-chip plan."""
    from lumina_jax import tpu
    from lumina_jax.pipeline import LuminaPipeline
    from lumina_jax.sharding import make_mesh

    try:
        target = tpu.tpu_slice(args.topology)
        # As the run itself: one device unless --mesh says otherwise.
        mesh = make_mesh(**(args.mesh or dict(fsdp=1)), devices=tpu.compile_devices(target))
        pipe = LuminaPipeline.abstract(args.model, args.dtype or "bfloat16", vae_dtype=args.vae_dtype).shard(mesh)
        if args.offload_text_encoder:
            pipe.offload_text_encoder()
        programs = pipe.lower(
            height=args.height, width=args.width, prompts=1, num_images_per_prompt=args.num_images,
            num_inference_steps=args.steps, guidance_scale=args.guidance, caption_length=args.caption_length,
            solver=args.solver, schedule=args.schedule, scaling_watershed=args.scaling_watershed,
            context_drop=args.context_drop,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    models = {name: module for name, module in models.items() if module is not None}
    offloaded = ("text_encoder",) if args.offload_text_encoder else ()
    plan = tpu.plan_programs(target, programs, models, offloaded, log=print)
    mesh_text = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    size = f"{args.height or pipe.default_sample_size}x{args.width or pipe.default_sample_size}"
    print(f"\n{args.model} at {size}, {args.num_images} image(s), {args.steps} steps, guidance {args.guidance}, "
          f"mesh {mesh_text}")  # fmt: skip
    print(plan.summary())
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "mesh": dict(mesh.shape), **plan.to_json()}, indent=1))
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.compile_only:
        return compile_only(args)
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
        pipe = LuminaPipeline.from_pretrained(args.model, dtype=args.dtype, vae_dtype=args.vae_dtype,
                                              revision=args.revision)  # fmt: skip
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    if args.mesh:
        from lumina_jax.sharding import make_mesh

        pipe.shard(make_mesh(**args.mesh))
    if args.offload_text_encoder:
        pipe.offload_text_encoder()
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

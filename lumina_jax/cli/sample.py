"""lumina-sample --model PATH_OR_HUB_ID --prompt "..." [options]: text to image with lumina-jax."""

import argparse
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from lumina_jax import jobs, sampling
from lumina_jax.assets import DIGITS_MODEL
from lumina_jax.cli import fail, use_compilation_cache
from lumina_jax.models.gemma2 import SYSTEM_PROMPTS

# transformers' notice that PyTorch is missing speaks to users of its models; we use its tokenizers only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    if not text.isdigit() or int(text) > jobs.MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {jobs.MAX_SEED}, got {text!r}")
    return int(text)


def utf8_text(value: str) -> str:
    """Command-line text: argument bytes that are not UTF-8 reach Python as surrogates, which tokenizers refuse."""
    if error := jobs.text_error(value):
        raise argparse.ArgumentTypeError(error)
    return value


def number(accept, expected: str):
    """An argparse type: a finite float that `accept` takes, else the error "expected {expected}"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


guidance = number(lambda v: v >= 0, "a number >= 0 (1 or less turns guidance off)")
positive_float = number(lambda v: v > 0, "a number > 0")
fraction = number(lambda v: 0 <= v <= 1, "a number from 0 to 1")
non_negative = number(lambda v: v >= 0, "a number >= 0")


def system_prompt(text: str) -> str:
    """--system-prompt: a name of the original's system prompts, else the text itself."""
    return SYSTEM_PROMPTS.get(text, utf8_text(text))


def lora_file(text: str) -> tuple[Path, float]:
    """--lora FILE[:SCALE]: a LoRA file and its scale (1 unless a number follows the last colon)."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def parse(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=str(DIGITS_MODEL),
        help="pipeline folder (diffusers layout or from `lumina-convert`) or a hub id, e.g. "
        "Alpha-VLLM/Lumina-Next-SFT-diffusers (default: the small "
        "digits model shipped with lumina-jax, 32x32 px); with --compile-only, a folder of "
        "config files is enough, or a released name: lumina-next-sft, lumina-t2i, lumina-image-2.0",
    )
    parser.add_argument("--revision", help="hub id: the branch, tag or commit to download (default: main)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", type=utf8_text, help="what to draw")
    prompts.add_argument(
        "--prompts-file",
        type=Path,
        help="one prompt a line, or JSONL (.jsonl) with per-line prompt and any of "
        "negative_prompt, seed, height, width, guidance, steps, num_images, or a JSON array (.json) of "
        "prompts or of such objects",
    )
    parser.add_argument("--negative-prompt", type=utf8_text, default=None)
    parser.add_argument(
        "--height", type=positive_int, default=None, help="pixels, a multiple of 16 (default: the model's)"
    )
    parser.add_argument(
        "--width", type=positive_int, default=None, help="pixels, a multiple of 16 (default: the model's)"
    )
    parser.add_argument("--steps", type=positive_int, default=sampling.SamplerOptions.num_inference_steps)
    parser.add_argument(
        "--guidance",
        type=guidance,
        default=sampling.SamplerOptions.guidance_scale,
        help="classifier-free guidance scale; <= 1 turns it off",
    )
    parser.add_argument("--seed", type=seed, default=0, help="image i of a prompt uses seed + i")
    parser.add_argument(
        "--num-images", type=positive_int, default=1, help=f"images per prompt (at most {jobs.MAX_IMAGES:,} a run)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="images per device per call: every local device draws this many at once",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="resume: draw only the images not in --out yet with their settings (as their PNGs record them)",
    )
    parser.add_argument("--solver", choices=sampling.SOLVERS, default=sampling.SamplerOptions.solver)
    parser.add_argument(
        "--schedule",
        choices=sampling.SCHEDULES,
        default=None,
        help="time steps (default: the model's reference: diffusers for Lumina-Next, shifted for Lumina-T2I)",
    )
    parser.add_argument(
        "--shift",
        type=positive_float,
        default=None,
        help="time shift of the diffusers and shifted schedules (default: the pipeline's scheduler config for "
        "the diffusers schedule and the model's own; else 1 for diffusers and 4 for shifted, as the original demos)",
    )
    parser.add_argument(
        "--scaling-watershed",
        type=fraction,
        default=None,
        help="time from which RoPE is NTK-scaled rather than linearly (default: 1 for Lumina-Next, 0 for Lumina-T2I)",
    )
    parser.add_argument(
        "--cfg-trunc-ratio",
        type=fraction,
        default=None,
        help="guidance only at the steps i with (i + 1) / steps <= this (Lumina2Pipeline's cfg_trunc_ratio; default 1)",
    )
    parser.add_argument(
        "--cfg-normalization",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rescale guided velocities to the conditional one's norm (default: on for Lumina-Image 2.0 only)",
    )
    parser.add_argument(
        "--cfg-trunc",
        type=non_negative,
        default=None,
        help="guidance only at model calls at times t < this, 0 (noise) to 1 (the original Lumina-Image 2.0 "
        "sampler's cfg_trunc; default 1: always)",
    )
    parser.add_argument(
        "--renorm-cfg",
        type=non_negative,
        default=None,
        help="cap guided velocities at this many times the conditional one's norm over the whole image (the "
        "original Lumina-Image 2.0 sampler's renorm_cfg, 1 there; replaces --cfg-normalization; default 0: no cap)",
    )
    parser.add_argument(
        "--lora",
        type=lora_file,
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA file into the transformer, times SCALE (default 1); repeat for several. Its layout may be "
        "diffusers' (PEFT), ComfyUI's / ai-toolkit's or kohya's",
    )
    parser.add_argument(
        "--system-prompt",
        type=system_prompt,
        default=None,
        help="Lumina-Image 2.0: the text before each prompt, or one of the original's by name: "
        f"{', '.join(SYSTEM_PROMPTS)} (default: real, as diffusers)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        help="image-to-image: start from this picture (resized to --height/--width; default: its own size)",
    )
    parser.add_argument(
        "--strength",
        type=fraction,
        default=None,
        help="image-to-image: how much of the flow to run from the picture, 0 to 1 (default 0.6, as the "
        "original sample_img2img.py; 1 ignores the picture, 0 returns it through the VAE)",
    )
    parser.add_argument(
        "--regions",
        nargs="+",
        type=utf8_text,
        metavar="CAPTION",
        help="compositional generation: one caption per cell of --grid, row by row (the prompt is the global one)",
    )
    parser.add_argument(
        "--grid", type=parse_grid, default=None, metavar="ROWSxCOLS", help="the cells of --regions (default: one row)"
    )
    parser.add_argument(
        "--context-drop",
        type=positive_int,
        default=sampling.SamplerOptions.context_drop,
        help="Context Drop window: 2 merges 2x2 image keys/values (faster at 2048 px, approximate); it must "
        "divide both sides of the image's token grid",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype (default: bfloat16 on GPUs and TPUs, float32 on CPUs)",
    )
    parser.add_argument(
        "--vae-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="the VAE's dtype (default: float32 where its config asks, as the SDXL VAE's does; "
        "bfloat16 halves the decoder's memory)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        help="folder for the PNGs (NNNNN_SEED.png: the prompt's line and the seed) and "
        "index.jsonl, which lists them with their settings",
    )
    parser.add_argument(
        "--offload-text-encoder",
        action="store_true",
        help="keep the text encoder's weights in host memory except while it encodes: frees their "
        "accelerator memory (4.7 GiB for Gemma-2B) for the sampler and the decoder",
    )
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        default=None,
        metavar="data=D,fsdp=F,tensor=T",
        help="this host's devices as a mesh: the transformer's weights split over fsdp and tensor, "
        "the images over data and fsdp (default: data = every local device, the weights "
        "whole on each)",
    )
    plan = parser.add_argument_group("compile only: will it fit on a Cloud TPU (no TPU and no weights needed)")
    plan.add_argument(
        "--compile-only",
        action="store_true",
        help="compile every program of the run for --topology with the TPU compiler (pip install -e "
        "'.[tpu]') and print each one's memory per chip; exit 1 if it does not fit",
    )
    plan.add_argument("--topology", help="the TPU slice: v5e-1, v5e-8, v6e-8, v5p-8, v4-8, ... or a JAX topology name")
    plan.add_argument(
        "--caption-length",
        type=positive_int,
        default=256,
        help="caption tokens to plan for, at most 256 (default: the most)",
    )
    plan.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.compile_only and not args.topology:
        parser.error("--compile-only needs --topology")
    if not args.compile_only and not (args.prompt or args.prompts_file):
        parser.error("one of --prompt or --prompts-file is required")
    if args.num_images > jobs.MAX_IMAGES:
        parser.error(f"argument --num-images: at most {jobs.MAX_IMAGES} images a run, got {args.num_images}")
    if args.json is not None and not writable(args.json):
        parser.error(f"argument --json: cannot write {args.json} (a folder, or its folder is missing or read-only)")
    if args.caption_length > 256:
        parser.error(f"argument --caption-length: at most 256 tokens, got {args.caption_length}")
    if args.cfg_normalization and args.renorm_cfg:
        parser.error(
            "--cfg-normalization (diffusers') and --renorm-cfg (the original's) both rescale guidance: choose one"
        )
    if args.prompts_file and not args.prompts_file.is_file():
        parser.error(f"argument --prompts-file: {args.prompts_file} is not a file")
    if args.strength is not None and args.image is None:
        parser.error("--strength needs --image")
    if args.grid is not None and not args.regions:
        parser.error("--grid needs --regions")
    if args.regions:
        args.grid = args.grid or (1, len(args.regions))
        if len(args.regions) != args.grid[0] * args.grid[1]:
            parser.error(
                f"--regions: {len(args.regions)} captions for a {args.grid[0]}x{args.grid[1]} grid; give one a cell"
            )
    if args.image is not None and args.compile_only:
        parser.error("--compile-only plans text-to-image; leave out --image")
    return args


def writable(path: Path) -> bool:
    """Whether a file can be written at `path` (checked before minutes of compiling)."""
    if path.exists():
        return path.is_file() and os.access(path, os.W_OK)
    return path.parent.is_dir() and os.access(path.parent, os.W_OK)


def parse_grid(text: str) -> tuple[int, int]:
    """A --grid value, "2x2" (rows x columns)."""
    rows, _, cols = text.partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) >= 1 and int(cols) >= 1):
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 2x2 or 1x4, got {text!r}")
    return int(rows), int(cols)


def parse_mesh(text: str) -> dict[str, int]:
    """A --mesh value, "data=2,fsdp=4,tensor=1", as mesh axis sizes; axes left out are 1."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected data=N, fsdp=N or tensor=N with N >= 1")
        sizes[name] = int(value)
    return sizes


def run_mesh(args: argparse.Namespace, devices) -> tuple:
    """The run's mesh over one host's devices (--mesh, default data = every device) and the images each
    pipeline call draws: --batch-size for each device of the batch axes."""
    from lumina_jax.sharding import BATCH_AXES, make_mesh

    mesh = make_mesh(**(args.mesh or {"data": len(devices)}), devices=devices)
    return mesh, args.batch_size * math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def compile_only(args: argparse.Namespace) -> int:
    """Compile the run's programs for a TPU slice without weights, print the per-chip plan."""
    from lumina_jax import tpu
    from lumina_jax.pipeline import LuminaPipeline

    try:
        target = tpu.tpu_slice(args.topology)
        # As the run itself: on one host's devices, each call drawing per_call images of as many prompts.
        mesh, per_call = run_mesh(args, [d for d in tpu.compile_devices(target) if d.process_index == 0])
        pipe = LuminaPipeline.abstract(args.model, args.dtype or "bfloat16", vae_dtype=args.vae_dtype).shard(mesh)
        if args.offload_text_encoder:
            pipe.offload_text_encoder()
        programs = pipe.lower(
            height=args.height,
            width=args.width,
            prompts=per_call,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            caption_length=args.caption_length,
            solver=args.solver,
            schedule=args.schedule,
            shift=args.shift,
            scaling_watershed=args.scaling_watershed,
            context_drop=args.context_drop,
            cfg_normalization=args.cfg_normalization,
            **{
                name: getattr(args, name)
                for name in ("cfg_trunc_ratio", "cfg_trunc", "renorm_cfg")
                if getattr(args, name) is not None
            },
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return fail(e)
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    models = {name: module for name, module in models.items() if module is not None}
    offloaded = ("text_encoder",) if args.offload_text_encoder else ()
    plan = tpu.plan_programs(target, programs, models, offloaded, log=print)
    mesh_text = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    size = f"{args.height or pipe.default_sample_size}x{args.width or pipe.default_sample_size}"
    print(
        f"\n{args.model} at {size}, {per_call} image(s) a call ({args.batch_size} per device), {args.steps} steps, "
        f"guidance {args.guidance}, mesh {mesh_text}"
    )
    print(plan.summary())
    if args.json:
        figures = {"model": args.model, "mesh": dict(mesh.shape), "images_per_call": per_call, **plan.to_json()}
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None, prog: str = "lumina-sample") -> int:
    args = parse(argv, prog)
    if args.compile_only:
        return compile_only(args)
    try:
        requests = jobs.read_requests(args.prompts_file) if args.prompts_file else [{"prompt": args.prompt}]
    except (FileNotFoundError, ValueError) as e:
        return fail(e)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        return fail(f"--out {args.out}: cannot write there ({e.strerror or e})")
    picture = None
    if args.image is not None:
        try:
            picture = Image.open(args.image)
            picture.load()
        except OSError as e:
            return fail(f"--image {args.image}: not an image this machine can read ({e})")
    import jax  # after argument parsing, so --help is instant

    from lumina_jax.sharding import initialize_distributed

    initialize_distributed()  # several hosts: each draws its own share of the jobs on its own devices
    use_compilation_cache()
    from lumina_jax.pipeline import LuminaPipeline

    args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    devices = jax.local_devices()
    start = time.perf_counter()
    try:
        mesh, images_per_call = run_mesh(args, devices)
        pipe = LuminaPipeline.from_pretrained(
            args.model, dtype=args.dtype, vae_dtype=args.vae_dtype, mesh=mesh, revision=args.revision
        )
        for path, scale in args.lora:
            pipe.load_lora_weights(path, scale)
        defaults = dict(
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            height=args.height or (picture.height if picture else pipe.default_sample_size),
            width=args.width or (picture.width if picture else pipe.default_sample_size),
            guidance=args.guidance,
            steps=args.steps,
            num_images=args.num_images,
        )
        todo = jobs.make_jobs(requests, defaults)
        for height, width in sorted({(job.height, job.width) for job in todo}):
            pipe.check_size(height, width, args.grid, args.context_drop)
        if args.system_prompt is not None:
            pipe.text_encoder.config.prepare_captions([], args.system_prompt)  # a family without one says so
    except (FileNotFoundError, PermissionError, ValueError) as e:
        if picture is not None and "height and width" in str(e):
            return fail(f"{e}; --image is {picture.width}x{picture.height}: give --height and --width to resize it")
        return fail(e)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    if args.offload_text_encoder:
        pipe.offload_text_encoder()
    chosen = dict(
        schedule=args.schedule,
        shift=args.shift,
        scaling_watershed=args.scaling_watershed,
        cfg_trunc_ratio=args.cfg_trunc_ratio,
        cfg_normalization=args.cfg_normalization,
        cfg_trunc=args.cfg_trunc,
        renorm_cfg=args.renorm_cfg,
        system_prompt=args.system_prompt,
    )
    settings = dict(
        solver=args.solver,
        **pipe.sampler_defaults(args.renorm_cfg or 0.0)
        | {name: value for name, value in chosen.items() if value is not None},
        context_drop=args.context_drop,
    )
    metadata = {"model": str(args.model), "dtype": args.dtype}
    if args.lora:  # so that --skip-existing redraws what another adapter drew
        metadata["lora"] = [f"{path}:{scale}" for path, scale in args.lora]
    draw = pipe
    if args.regions:
        settings |= dict(region_prompts=args.regions, grid=args.grid)
    if picture is not None:
        settings["strength"] = 0.6 if args.strength is None else args.strength
        metadata["image"] = str(args.image)
        draw = functools.partial(pipe, image=picture)
    try:
        report = jobs.run_jobs(
            draw,
            todo,
            args.out,
            per_call=images_per_call,
            skip_existing=args.skip_existing,
            metadata=metadata,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            **settings,
        )
    except jax.errors.JaxRuntimeError as e:
        # Accelerators say RESOURCE_EXHAUSTED; XLA's CPU client can say INTERNAL: "Failed to allocate memory".
        if not re.search(r"RESOURCE_EXHAUSTED|out of memory|failed to allocate", str(e), re.IGNORECASE):
            raise
        print(
            f"error: out of memory ({str(e).splitlines()[0][:200]}); try a smaller --batch-size, "
            "--offload-text-encoder, --vae-dtype bfloat16, or --mesh fsdp=N to split the weights",
            file=sys.stderr,
        )
        return 1
    speed = (
        f"{report.warm_images / report.warm_seconds:.2f} images/s after compilation "
        f"({report.warm_images / report.warm_seconds / len(devices):.2f} per device)"
        if report.warm_images
        else "every call compiled a program (a second run reuses them)"
    )
    share = f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
    print(
        f"wrote {report.written} image(s) to {args.out}/{share} in {report.seconds:.1f} s, "
        f"{report.skipped} already there; {speed}"
    )
    return 0

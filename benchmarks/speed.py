"""Speed of ours against the PyTorch reference (diffusers), side by side in one process.

    python -m benchmarks.speed --setup cpu [--json speed.json]   # this CPU: small transformer, tiny pipeline, float32
    python -m benchmarks.speed --setup gpu [--json speed.json]   # released 2B shapes, bfloat16, 1024^2 and 2048^2

(from the repository root: the PyTorch reference models are the tests' own, `tests/reference.py`)

Rows: one transformer step (CFG batch 2, the same random weights on both sides), the whole
pipeline (text encoding, 30 CFG steps, VAE decode), ours' compile time, and peak memory (device
memory per framework on GPUs; on CPU the process's resident high-water mark, both frameworks
together). Both sides run alternately after warm-up; the table gives medians and ratios. Context
Drop rows compare ours exact with ours merging 2x2 keys and values (no diffusers counterpart) and
give how far the velocity moves: random weights and noise latents have no redundancy to merge, so
that figure is an upper bound for real images.

The GPU mode runs unattended in one call on an H100/H200 of a few minutes, once diffusers is
installed there (e.g. from carried wheels: `pip install --no-deps wheels/*.whl`). Its pipelines
use random weights of the released shapes: diffusers' default initialisation, ours constant
(random initialisation of 2B parameters compiles a program per shape; the values do not change
the time). diffusers decodes with a bfloat16 VAE (its pipeline passes bfloat16 latents), ours by
default with the float32 VAE that the SDXL config's force_upcast asks for (`--vae-dtype bfloat16`
decodes as diffusers does; peak memory is per process, so run it separately). On GPUs the
transformer rows also report accuracy: ours and diffusers in bfloat16 against diffusers in float32.
"""

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL as TorchVAE  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel  # noqa: E402
from diffusers import LuminaPipeline as TorchPipeline  # noqa: E402
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina  # noqa: E402
from flax import nnx
from transformers import GemmaConfig as TorchGemmaConfig  # noqa: E402
from transformers import GemmaModel  # noqa: E402

from lumina_jax import PRESETS, LuminaPipeline, NextDiT, NextDiTConfig  # noqa: E402
from lumina_jax.models.gemma import GEMMA_2B, GemmaEncoder  # noqa: E402
from lumina_jax.models.vae import SDXL_VAE, AutoencoderKL  # noqa: E402
from lumina_jax.weights.nextdit import TransformerCheckpoint, build_model  # noqa: E402
from tests.reference import build_tokenizer, random_pipeline, random_transformer, relative_error  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, dramatic light"
CAPTION_TOKENS = 128
RELEASED = {
    k: v for k, v in PRESETS["NextDiT_2B_GQA_patch2"].to_dict().items() if k not in ("_class_name", "sample_size")
}
SETUPS = {
    # REFERENCE.md's CPU figure: hidden 576, 8 layers, 8/2 heads, 256 image tokens (32x32 latents), batch 2.
    "cpu": dict(
        transformer=dict(
            hidden_size=576,
            num_layers=8,
            num_attention_heads=8,
            num_kv_heads=2,
            multiple_of=256,
            cross_attention_dim=2048,
        ),
        latent_sizes=[32],
        dtype="float32",
        step_repeats=10,
        pipeline_repeats={256: 5},
        context_drop={64: 2},
    ),
    "gpu": dict(
        transformer=RELEASED,
        latent_sizes=[128, 256],
        dtype="bfloat16",
        step_repeats=10,
        pipeline_repeats={1024: 3, 2048: 1},
        context_drop={256: 2},
    ),
}
STEPS = 30
PAUSE_S = 0.5


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn so that drift on a shared machine hits all.

    Each call waits PAUSE_S first, so that the worker threads of the framework that ran before
    (both keep CPU thread pools, which may spin briefly after work) are idle when the other starts.
    """
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(PAUSE_S)
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class InMemoryTensor:
    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def load(self) -> np.ndarray:
        return self.array


def ours_from(reference, config: dict, dtype: str, backend: str | None = None) -> NextDiT:
    """Our Next-DiT with the reference's weights, through the same importer as a checkpoint folder."""
    tensors = {k: InMemoryTensor(v.detach().float().cpu().numpy()) for k, v in reference.state_dict().items()}
    checkpoint = TransformerCheckpoint(Path("diffusers-in-memory"), NextDiTConfig(**config), tensors, "diffusers")
    return build_model(checkpoint, dtype, attention_backend=backend, progress=False)


def step_inputs(latent: int, caption_dim: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, latent, latent), dtype=np.float32)
    caption = rng.standard_normal((2, CAPTION_TOKENS, caption_dim), dtype=np.float32)
    mask = np.zeros((2, CAPTION_TOKENS), np.int64)
    mask[0, :100], mask[1, :7] = 1, 1  # [cond, uncond]: a long prompt and an empty negative one
    return x, np.array([0.3, 0.3], np.float32), caption, mask


def diffusers_step(reference, device, torch_dtype, inputs, base):
    x, t, caption, mask = inputs
    rope = get_2d_rotary_pos_embed_lumina(reference.head_dim, 384, 384).to(device)
    args = [torch.from_numpy(a).to(device) for a in (x, t, caption, mask)]
    args[0], args[2] = args[0].to(torch_dtype), args[2].to(torch_dtype)
    kwargs = dict(image_rotary_emb=rope, cross_attention_kwargs={"base_sequence_length": base}, return_dict=False)

    def step():
        with torch.no_grad():
            out = reference(*args, **kwargs)[0]
        synchronize()
        return out

    return step


def ours_step(model: NextDiT, inputs, base, *, as_sampled: bool = False, **options):
    """One forward pass; as_sampled: as the sampler runs it, with the caption's keys and values
    computed beforehand (once per image, not timed)."""
    graphdef, params = nnx.split(model)
    args = [jnp.asarray(a) for a in inputs]
    args[0], args[2] = args[0].astype(model.dtype), args[2].astype(model.dtype)
    caption_kv = model.caption_keys_values(args[2]) if as_sampled else None
    forward = jax.jit(
        lambda params, caption_kv, *a: nnx.merge(graphdef, params)(
            *a, base_sequence_length=base, caption_kv=caption_kv, **options
        )
    )
    return lambda: forward(params, caption_kv, *args).block_until_ready()


def transformer_rows(setup: dict, device: str, results: dict) -> None:
    config, dtype = setup["transformer"], setup["dtype"]
    torch_dtype = getattr(torch, dtype)
    reference = random_transformer(seed=0, **config)
    ours = ours_from(reference, config, dtype)
    base = NextDiTConfig(**config).base_sequence_length
    if device == "cuda":
        xla = ours_from(reference, config, dtype, backend="xla")
        reference = reference.to(device)
        inputs = step_inputs(setup["latent_sizes"][0], config["cross_attention_dim"])
        exact = diffusers_step(reference, device, torch.float32, inputs, base)().float().cpu().numpy()
        reference = reference.to(torch_dtype)
        theirs = diffusers_step(reference, device, torch_dtype, inputs, base)().float().cpu().numpy()
        mine = np.asarray(ours_step(ours, inputs, base)(), np.float32)
        results["accuracy"] = {
            "diffusers_bf16_vs_fp32": relative_error(theirs, exact),
            "ours_bf16_vs_diffusers_fp32": relative_error(mine, exact),
            "ours_cudnn_vs_xla": relative_error(mine, np.asarray(ours_step(xla, inputs, base)(), np.float32)),
        }
        del xla
        report(results["accuracy"])

    for latent in setup["latent_sizes"]:
        inputs = step_inputs(latent, config["cross_attention_dim"])
        fns = {
            "diffusers": diffusers_step(reference, device, torch_dtype, inputs, base),
            "ours": ours_step(ours, inputs, base),
            "as_sampled": ours_step(ours, inputs, base, as_sampled=True),
        }
        compile_s = {name: timed(fn) for name, fn in fns.items()}
        medians = alternate(fns, setup["step_repeats"] if latent <= 128 else 4)
        for name, label in [("ours", ""), ("as_sampled", ", caption k/v once per image")]:
            row = dict(
                name=f"transformer step {latent * 8}px{label}",
                diffusers_s=medians["diffusers"],
                ours_s=medians[name],
                ours_first_call_s=compile_s[name],
            )
            results["rows"].append(row)
            print_row(row)
    context_drop_rows(ours, setup, base, results)


def context_drop_rows(ours: NextDiT, setup: dict, base: int, results: dict) -> None:
    for latent, window in setup["context_drop"].items():
        inputs = step_inputs(latent, setup["transformer"]["cross_attention_dim"])
        fns = {"exact": ours_step(ours, inputs, base), "dropped": ours_step(ours, inputs, base, context_drop=window)}
        velocity = {name: np.asarray(fn(), np.float32) for name, fn in fns.items()}  # compiles both
        medians = alternate(fns, setup["step_repeats"] if latent <= 128 else 4)
        row = dict(
            name=f"transformer step {latent * 8}px, Context Drop {window}",
            ours_exact_s=medians["exact"],
            ours_context_drop_s=medians["dropped"],
            speedup=medians["exact"] / medians["dropped"],
            relative_change=relative_error(velocity["dropped"], velocity["exact"]),
        )
        results["rows"].append(row)
        print(
            f"| {row['name']:<52} | ours exact {1e3 * row['ours_exact_s']:.1f} ms, with Context Drop "
            f"{1e3 * row['ours_context_drop_s']:.1f} ms: {row['speedup']:.2f}x; velocity moves "
            f"{row['relative_change']:.3f} (max-relative) |",
            flush=True,
        )


def tiny_pipelines(folder: Path, vae_dtype: str):
    """diffusers' pipeline of tiny random components and ours loaded from the same folder."""
    reference = random_pipeline(folder, corpus=[PROMPT])
    return reference, LuminaPipeline.from_pretrained(folder, dtype="float32", vae_dtype=vae_dtype, progress=False)


def released_pipelines(device: str, vae_dtype: str):
    """Both pipelines with the released shapes (random weights), sharing one tokenizer."""
    tokenizer = build_tokenizer([PROMPT])
    with torch.device(device):
        transformer = LuminaNextDiT2DModel(sample_size=128, **RELEASED).to(torch.bfloat16).eval()
        gemma = GemmaModel(TorchGemmaConfig(**vars(GEMMA_2B))).to(torch.bfloat16).eval()
        vae = TorchVAE(**vars(SDXL_VAE)).to(torch.bfloat16).eval()
    reference = TorchPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=gemma,
        tokenizer=tokenizer,
    )
    reference.set_progress_bar_config(disable=True)
    bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours = LuminaPipeline(
        constant_weights(lambda: NextDiT(PRESETS["NextDiT_2B_GQA_patch2"], rngs=nnx.Rngs(0), **bf16)),
        constant_weights(lambda: GemmaEncoder(GEMMA_2B, rngs=nnx.Rngs(0), **bf16)),
        constant_weights(lambda: AutoencoderKL(SDXL_VAE, dtype=vae_dtype, param_dtype=vae_dtype, rngs=nnx.Rngs(0))),
        tokenizer,
    )
    return reference, ours


def constant_weights(make):
    """The model with every parameter 0.01, built without running any initialiser."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01, leaf.dtype), state))


def pipeline_rows(setup_name: str, setup: dict, device: str, results: dict, vae_dtype: str) -> None:
    if setup_name == "cpu":
        reference, ours = tiny_pipelines(Path(tempfile.mkdtemp()), vae_dtype)
    else:
        reference, ours = released_pipelines(device, vae_dtype)
    for size, repeats in setup["pipeline_repeats"].items():
        settings = dict(prompt=PROMPT, height=size, width=size, guidance_scale=4.0, output_type="np")
        # diffusers cleans captions only with beautifulsoup4 and ftfy; ours lower-cases and strips, as it then does.
        clean = dict(clean_caption=False)
        latents = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)

        def theirs(steps=STEPS):
            start = torch.from_numpy(latents).to(device=device, dtype=reference.transformer.dtype)
            reference(latents=start, num_inference_steps=steps, **settings, **clean)
            synchronize()

        def mine():
            ours(latents=latents, num_inference_steps=STEPS, **settings)

        first_s = timed(mine)
        theirs(steps=2)  # warm-up: kernels and allocator, not a whole image
        medians = alternate({"diffusers": theirs, "ours": mine}, repeats)
        row = dict(
            name=f"pipeline {size}px, {STEPS} steps, CFG",
            diffusers_s=medians["diffusers"],
            ours_s=medians["ours"],
            ours_first_call_s=first_s,
        )
        results["rows"].append(row)
        print_row(row)


def peak_memory(device: str) -> dict[str, float]:
    if device == "cuda":
        return {
            "ours_device_gb": jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 1e9,
            "diffusers_device_gb": torch.cuda.max_memory_allocated() / 1e9,
        }
    # ru_maxrss is in KiB on Linux; one process holds both frameworks.
    return {"process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def print_row(row: dict) -> None:
    row["speedup"] = row["diffusers_s"] / row["ours_s"]
    print(
        f"| {row['name']:<52} | {1e3 * row['diffusers_s']:>12.1f} | {1e3 * row['ours_s']:>10.1f} | "
        f"{row['speedup']:>6.2f}x | {row['ours_first_call_s']:>14.1f} |",
        flush=True,
    )


def report(values: dict) -> None:
    print(json.dumps(values, indent=1), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), default="cpu")
    parser.add_argument("--only", choices=["transformer", "pipeline"], help="run one part")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--vae-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="our VAE's dtype (float32 as the SDXL config asks; diffusers' is bfloat16)",
    )
    args = parser.parse_args()
    setup = SETUPS[args.setup]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {
        "device": jax.devices()[0].device_kind,
        "torch_device": device,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "setup": args.setup,
        "dtype": setup["dtype"],
        "vae_dtype": args.vae_dtype,
        "rows": [],
    }
    print(
        f"{results['device']} ({device} for torch, {results['torch_threads']} threads), {setup['dtype']}, "
        f"our VAE in {args.vae_dtype}"
    )
    print(f"| {'':<52} | {'diffusers ms':>12} | {'ours ms':>10} | {'ratio':>7} | {'ours 1st call s':>14} |")
    print(f"|{'-' * 54}|{'-' * 14}|{'-' * 12}|{'-' * 9}|{'-' * 16}|", flush=True)
    if args.only != "pipeline":
        transformer_rows(setup, device, results)
    if args.only != "transformer":
        pipeline_rows(args.setup, setup, device, results, args.vae_dtype)
    results["peak_memory"] = peak_memory(device)
    report(results["peak_memory"])
    if args.json:
        temporary = args.json.with_name(args.json.name + ".tmp")
        temporary.write_text(json.dumps(results, indent=1))
        os.replace(temporary, args.json)


if __name__ == "__main__":
    main()

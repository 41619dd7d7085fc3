"""One Next-DiT denoising step (CFG batch of 2): ours, jitted, against diffusers' transformer.

    python benchmarks/transformer_step.py --setup cpu      # small config, float32 (CI-like CPU)
    python benchmarks/transformer_step.py --setup gpu      # released 2B shapes, bfloat16, 1024^2 and 2048^2

Both run in this process on the same random weights (every parameter randomised), alternating,
after warm-up; the table gives medians and ratios, and --json writes the figures. On GPUs it also
reports accuracy: ours and diffusers in bfloat16 against diffusers in float32, and cuDNN against
XLA attention.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina  # noqa: E402
from reference import random_transformer, relative_error  # noqa: E402

from lumina_jax import NextDiTConfig  # noqa: E402
from lumina_jax.weights.nextdit import NextDiTCheckpoint, build_model  # noqa: E402

SETUPS = {
    # hidden 576, 8 layers, 8/2 heads; 256 image tokens (32x32 latents), batch 2: the CPU anchor's shapes
    "cpu": dict(config=dict(hidden_size=576, num_layers=8, num_attention_heads=8, num_kv_heads=2, multiple_of=256,
                            cross_attention_dim=2048), latent_sizes=[32], dtype="float32", repeats=10),
    "gpu": dict(config=dict(hidden_size=2304, num_layers=24, num_attention_heads=32, num_kv_heads=8, multiple_of=256,
                            cross_attention_dim=2048), latent_sizes=[128, 256], dtype="bfloat16", repeats=10),
}  # fmt: skip
CAPTION_TOKENS = 128


class InMemoryTensor:
    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def load(self) -> np.ndarray:
        return self.array


def ours_from(reference, config: dict, dtype: str, backend: str | None = None):
    tensors = {k: InMemoryTensor(v.detach().float().cpu().numpy()) for k, v in reference.state_dict().items()}
    checkpoint = NextDiTCheckpoint(Path("diffusers-in-memory"), NextDiTConfig(**config), tensors, "diffusers")
    return build_model(checkpoint, dtype, attention_backend=backend, progress=False)


def make_inputs(latent: int, caption_dim: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, latent, latent), dtype=np.float32)
    caption = rng.standard_normal((2, CAPTION_TOKENS, caption_dim), dtype=np.float32)
    mask = np.zeros((2, CAPTION_TOKENS), np.int64)
    mask[0, :100], mask[1, :7] = 1, 1  # [cond, uncond]: a long prompt and an empty negative one
    return x, np.array([0.3, 0.3], np.float32), caption, mask


def diffusers_step(reference, device, torch_dtype, x, t, caption, mask, base):
    rope = get_2d_rotary_pos_embed_lumina(reference.head_dim, 384, 384).to(device)
    args = [torch.from_numpy(a).to(device) for a in (x, t, caption)]
    args = [args[0].to(torch_dtype), args[1], args[2].to(torch_dtype), torch.from_numpy(mask).to(device)]

    def step():
        with torch.no_grad():
            out = reference(*args, image_rotary_emb=rope, cross_attention_kwargs={"base_sequence_length": base},
                            return_dict=False)[0]  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return step


def ours_step(model, x, t, caption, mask, base):
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, *a: nnx.merge(graphdef, params)(*a, base_sequence_length=base))
    args = [jnp.asarray(a) for a in (x, t, caption, mask)]
    args[0], args[2] = args[0].astype(model.dtype), args[2].astype(model.dtype)
    return lambda: forward(params, *args).block_until_ready()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), default="cpu")
    parser.add_argument("--layers", type=int, help="override the number of layers (quick checks)")
    parser.add_argument("--latents", type=int, nargs="+", help="override the latent sizes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    setup = SETUPS[args.setup]
    config = {**setup["config"], **({"num_layers": args.layers} if args.layers else {})}
    latent_sizes, dtype = args.latents or setup["latent_sizes"], setup["dtype"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    results = {
        "device": str(jax.devices()[0].device_kind),
        "torch_device": device,
        "dtype": dtype,
        "config": config,
        "rows": [],
    }
    print(f"{results['device']}: jax {jax.__version__}, torch {torch.__version__}, {dtype}", flush=True)

    reference = random_transformer(seed=0, **config)
    ours = ours_from(reference, config, dtype)
    base = NextDiTConfig(**config).base_sequence_length
    if args.setup == "gpu":
        xla = ours_from(reference, config, dtype, backend="xla")
        reference = reference.to(device)
        x, t, caption, mask = make_inputs(latent_sizes[0], config["cross_attention_dim"])
        exact = diffusers_step(reference, device, torch.float32, x, t, caption, mask, base)().float().cpu().numpy()
        reference = reference.to(torch_dtype)
        theirs_bf16 = diffusers_step(reference, device, torch_dtype, x, t, caption, mask, base)().float().cpu().numpy()
        ours_bf16 = np.asarray(ours_step(ours, x, t, caption, mask, base)(), np.float32)
        ours_xla = np.asarray(ours_step(xla, x, t, caption, mask, base)(), np.float32)
        del xla
        results["accuracy"] = {
            "diffusers_bf16_vs_fp32": relative_error(theirs_bf16, exact),
            "ours_bf16_vs_diffusers_fp32": relative_error(ours_bf16, exact),
            "ours_cudnn_vs_xla": relative_error(ours_bf16, ours_xla),
        }
        print(json.dumps(results["accuracy"], indent=1), flush=True)

    for latent in latent_sizes:
        x, t, caption, mask = make_inputs(latent, config["cross_attention_dim"])
        theirs = diffusers_step(reference, device, torch_dtype, x, t, caption, mask, base)
        mine = ours_step(ours, x, t, caption, mask, base)
        compile_s = timed(mine)
        theirs()
        mine()
        times = {"diffusers": [], "ours": []}
        for _ in range(setup["repeats"] if latent <= 128 else 4):  # alternate, so drift hits both
            times["diffusers"].append(timed(theirs))
            times["ours"].append(timed(mine))
        row = {"pixels": latent * 8, "tokens": (latent // 2) ** 2, "compile_s": compile_s,
               **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}}  # fmt: skip
        row["speedup"] = row["diffusers_ms"] / row["ours_ms"]
        results["rows"].append(row)
        print(f"{row['pixels']:>5}px {row['tokens']:>6} tokens  diffusers {row['diffusers_ms']:8.1f} ms  "
              f"ours {row['ours_ms']:8.1f} ms  speedup {row['speedup']:.2f}x  (ours compiled in {compile_s:.1f} s)",
              flush=True)  # fmt: skip
    if device == "cuda":
        results["peak_gb"] = {"jax": jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 1e9,
                              "torch": torch.cuda.max_memory_allocated() / 1e9}  # fmt: skip
        print(results["peak_gb"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

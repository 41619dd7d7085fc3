"""The flow-ODE sampler: the whole denoising loop as one compiled program.

Model time t runs from 0 (noise) to 1 (data) and the model predicts the velocity dx/dt. A schedule
is the list of steps (start time, step size); the solver integrates over them inside a
`lax.fori_loop`. Classifier-free guidance doubles the batch ([cond, uncond], as diffusers orders
it); with CFG truncation (Lumina-Image 2.0) the model calls after the cut run the conditional half alone.
Resolution extrapolation follows Lumina-Next's time-aware scaled RoPE: both RoPE tables (linear and
NTK scaled) are computed once, and each step picks one by comparing t with
`scaling_watershed`. Guidance scale, prompt embeddings and latents are traced: changing them never
recompiles; programs are cached per shape and option.
"""

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lumina_jax.models.family import Transformer

Solver = Literal["euler", "midpoint"]
SOLVERS = ("euler", "midpoint")
SCHEDULES = ("diffusers", "lumina2", "shifted", "sigmoid")
GUIDED_CHANNELS = 3  # released samples guide latent channels 0..2 only (a quirk kept from DiT)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """Steps of the flow ODE: each starts at `times[i]` (model time) and advances by `steps[i]`."""

    times: np.ndarray  # [num_steps] float32
    steps: np.ndarray  # [num_steps] float32, positive, summing to about 1

    @classmethod
    def from_grid(cls, grid: np.ndarray) -> "FlowSchedule":
        grid = np.asarray(grid, np.float32)
        return cls(grid[:-1], np.diff(grid))

    def image_to_image_start(self, strength: float) -> tuple[int, float]:
        """Where image-to-image starts, as the original Lumina-Next sampler cuts its grid of points
        (`t[int(num_points * (1 - strength)):]`): the first step to take and its time t0, at which the
        state is t0 * image + (1 - t0) * noise. strength 1: every step from t0 = 0; 0: none (t0 = 1)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        steps = len(self.times)
        first = min(int((steps + 1) * (1 - strength)), steps)
        return first, float(self.times[first] if first < steps else self.times[-1] + self.steps[-1])


def start_from_image(noise: jax.Array, image_latents: jax.Array, t0: float) -> jax.Array:
    """Image-to-image's start state at model time t0: the point on the straight path from noise to the image."""
    return noise * (1 - t0) + image_latents * t0


def diffusers_schedule(num_steps: int, *, shift: float = 1.0, sigmas: list[float] | None = None) -> FlowSchedule:
    """diffusers' FlowMatchEulerDiscreteScheduler as LuminaPipeline uses it, rounding included.

    sigma = 1 - t: timesteps spaced evenly from 1000 * sigma_max to 1000 * sigma_min (the shifted
    ends of the 1000 training sigmas, in float32, as the scheduler keeps them) or the given sigmas,
    shifted by shift*s / (1 + (shift-1)*s), then a final 0. The model sees 1 - (1000*sigma)/1000.
    """

    def shifted(sigma, dtype):
        sigma = np.asarray(sigma, dtype)
        return dtype(shift) * sigma / (1 + dtype(shift - 1) * sigma)

    if sigmas is None:
        # the scheduler keeps its 1000 training sigmas, shifted, in float32; the ends bound the grid
        sigma_max, sigma_min = shifted([1.0, np.float32(1) / np.float32(1000)], np.float32)
        grid = np.linspace(1000.0 * float(sigma_max), 1000.0 * float(sigma_min), num_steps) / 1000.0
        sigma = shifted(grid, np.float64).astype(np.float32)
    else:  # the scheduler takes given sigmas as float32 and shifts them in float32
        sigma = shifted(sigmas, np.float32)
        if sigma.ndim != 1 or len(sigma) != num_steps:
            raise ValueError(
                f"sigmas must be a list of num_inference_steps={num_steps} values, got shape {sigma.shape}"
            )
    timesteps = sigma * np.float32(1000.0)
    times = np.float32(1.0) - timesteps / np.float32(1000.0)
    sigma = np.append(sigma, np.float32(0.0))
    return FlowSchedule(times.astype(np.float32), (sigma[:-1] - sigma[1:]).astype(np.float32))


def lumina2_schedule(num_steps: int, *, shift: float = 1.0) -> FlowSchedule:
    """diffusers' Lumina2Pipeline: sigmas linspace(1, 1/N, N) through the flow-match scheduler (its shift)."""
    return diffusers_schedule(num_steps, shift=shift, sigmas=np.linspace(1.0, 1 / num_steps, num_steps))


def shifted_schedule(num_steps: int, *, shift: float = 4.0) -> FlowSchedule:
    """The original Lumina-Next sampler's grid: uniform in [0, 1], then t' = t / (t + s - s*t).

    s > 1 packs the steps near the noise end. (The original's "30 steps" is a grid of 30 points,
    29 steps; here num_steps counts steps.)
    """
    t = np.linspace(0.0, 1.0, num_steps + 1)
    return FlowSchedule.from_grid(t / (t + shift - shift * t))


def sigmoid_schedule(num_steps: int, *, steepness: float = 6.0) -> FlowSchedule:
    """A sigmoid time discretisation for few-step sampling, after the Lumina-Next paper.

    t_i = (S(k(u_i - 1/2)) - S(-k/2)) / (S(k/2) - S(-k/2)), u_i = i / N, S the logistic function,
    k the steepness: steps are short at both ends of the trajectory and long in the middle, and the
    grid still runs exactly from 0 to 1. (Our parameterisation; see the README.)
    """
    u = np.linspace(0.0, 1.0, num_steps + 1)
    logistic = 1.0 / (1.0 + np.exp(-steepness * (u - 0.5)))
    low, high = 1.0 / (1.0 + math.exp(steepness / 2)), 1.0 / (1.0 + math.exp(-steepness / 2))
    return FlowSchedule.from_grid((logistic - low) / (high - low))


def make_schedule(name: str, num_steps: int, *, shift: float | None = None, sigmas=None) -> FlowSchedule:
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")
    if sigmas is not None and name not in ("diffusers", "lumina2"):
        raise ValueError("sigmas apply to the 'diffusers' and 'lumina2' schedules only")
    if name == "diffusers" or (name == "lumina2" and sigmas is not None):  # Lumina2Pipeline takes sigmas as given
        return diffusers_schedule(num_steps, shift=1.0 if shift is None else shift, sigmas=sigmas)
    if name == "lumina2":
        return lumina2_schedule(num_steps, shift=1.0 if shift is None else shift)
    if name == "shifted":
        return shifted_schedule(num_steps, shift=4.0 if shift is None else shift)
    if name == "sigmoid":
        return sigmoid_schedule(num_steps)
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How to sample, the defaults in this one place: a hashable value, for a pipeline call, `lower` and
    `sample` alike. Names as diffusers' LuminaPipeline.__call__ (and Lumina2Pipeline's) where it has them.
    schedule, shift, scaling_watershed, cfg_all_channels and cfg_normalization None: the model family's
    (`LuminaPipeline.sampler_defaults`; shift also the scheduler config's; the sampler alone reads the two
    cfg_ ones None as False). guidance_scale, scaling_watershed, cfg_trunc_ratio, cfg_trunc, renorm_cfg and
    first_step are traced values of the compiled sampler: a new one reuses its program (a first truncation or cap
    compiles one)."""

    guidance_scale: float = 4.0  # > 1: classifier-free guidance, the batch doubled ([cond, uncond])
    num_inference_steps: int = 30
    solver: Solver = "euler"
    schedule: str | None = None  # one of SCHEDULES (`make_schedule`)
    shift: float | None = None  # the schedule's time shift
    sigmas: tuple[float, ...] | None = None  # the diffusers schedule's sigmas, num_inference_steps of them
    scaling_watershed: float | None = None  # RoPE scaled linearly while t < this, NTK-scaled from there
    proportional_attn: bool = True  # attention logits scaled for the sequence length (Lumina-Next)
    cfg_all_channels: bool | None = None  # guide every channel, not 0..2 as Lumina-Next's and Lumina-T2I's samplers
    cfg_trunc_ratio: float = 1.0  # guidance at step i (from 0) only while (i + 1) / num_inference_steps <= this
    cfg_normalization: bool | None = None  # guided velocity rescaled to the conditional one's norm over the last axis
    # The original Lumina-Image 2.0 sampler's (forward_with_cfg) guidance options: guidance only at model calls whose
    # time t < cfg_trunc (1 or more: at every call), and the guided velocity capped at renorm_cfg times the
    # conditional one's norm over each whole sample (0: no cap; excludes cfg_normalization)
    cfg_trunc: float = 1.0
    renorm_cfg: float = 0.0
    context_drop: int = 1  # > 1: the paper's Context Drop, an approximation (`NextDiT.__call__`)
    first_step: int = 0  # the schedule's step to start from (image-to-image)

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if not (math.isfinite(self.cfg_trunc_ratio) and self.cfg_trunc_ratio >= 0):
            raise ValueError(
                f"cfg_trunc_ratio must be >= 0 (1 or more: guidance at every step), got {self.cfg_trunc_ratio}"
            )
        for name in ("cfg_trunc", "renorm_cfg"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        if self.renorm_cfg > 0 and self.cfg_normalization:
            raise ValueError(
                "cfg_normalization (diffusers') and renorm_cfg (the original sampler's) both rescale the guided "
                "velocity: choose one"
            )
        if self.sigmas is not None:  # a list, as diffusers takes them, kept as a tuple: hashable
            object.__setattr__(self, "sigmas", tuple(self.sigmas))

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def resolution_scale(model: Transformer, height: int, width: int) -> float:
    """The RoPE factor for latents of height x width: > 1 means extrapolation (the family's rule,
    `resolution_scale` of its config)."""
    return model.config.resolution_scale(height, width)


# jax.jit over the model's split state: nnx.jit walks the module graph on every call.
@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "solver",
        "guided_channels",
        "base_sequence_length",
        "scale",
        "context_drop",
        "cfg_truncation",
        "cfg_normalization",
        "capped",
    ),
)
def _integrate(
    graphdef,
    params,
    latents,
    caption,
    caption_mask,
    guidance_scale,
    times,
    steps,
    scaling_watershed,
    first_step,
    guided_steps,
    cfg_trunc,
    renorm_cfg,
    caption_regions,
    *,
    solver,
    guided_channels,
    base_sequence_length,
    scale,
    context_drop,
    cfg_truncation,
    cfg_normalization,
    capped,
):
    model = nnx.merge(graphdef, params)
    batch, channels, height, width = latents.shape
    guided = guided_channels > 0
    linear_rope = model.image_rope(height, width, linear_factor=scale, ntk_factor=1.0)
    ntk_rope = model.image_rope(height, width, linear_factor=1.0, ntk_factor=scale)
    # only the options in effect: a family takes the ones it has (Lumina-Image 2.0 none of these)
    options = {} if base_sequence_length is None else dict(base_sequence_length=base_sequence_length)
    options |= {} if context_drop == 1 else dict(context_drop=context_drop)

    def conditioned(rows):
        """The model on `rows` caption rows, its caption's keys and values computed once (the same at every step)."""
        regions = {} if caption_regions is None else dict(caption_regions=caption_regions[rows])  # Next-DiT's
        caption_kv = model.caption_keys_values(caption[rows], caption_mask[rows])

        def call(x, t, rope):
            t_batch = jnp.full((x.shape[0],), t, jnp.float32)
            out = model(
                x, t_batch, caption[rows], caption_mask[rows], rope=rope, caption_kv=caption_kv, **options, **regions
            )
            return out[:, :channels].astype(jnp.float32)

        return call

    everything = conditioned(slice(None))

    def guided_velocity(x, t, rope):
        out = everything(jnp.concatenate([x, x]), t, rope)
        cond, uncond = out[:batch], out[batch:]
        mixed = uncond + guidance_scale * (cond - uncond)
        mixed = cond.at[:, :guided_channels].set(mixed[:, :guided_channels])
        if cfg_normalization:  # diffusers' Lumina2Pipeline: back to the conditional velocity's norm over the last axis
            return mixed * (
                jnp.linalg.norm(cond, axis=-1, keepdims=True) / jnp.linalg.norm(mixed, axis=-1, keepdims=True)
            )
        if capped:  # the original's: down to renorm_cfg times the conditional velocity's norm over the whole sample
            cap = renorm_cfg * jnp.linalg.vector_norm(cond, axis=(1, 2, 3), keepdims=True)
            norm = jnp.linalg.vector_norm(mixed, axis=(1, 2, 3), keepdims=True)
            return jnp.where(norm >= cap, mixed * (cap / norm), mixed)
        return mixed

    unguided_velocity = conditioned(slice(0, batch)) if cfg_truncation else everything

    def velocity(x, t, i):
        rope = jax.tree.map(lambda a, b: jnp.where(t < scaling_watershed, a, b), linear_rope, ntk_rope)
        if not guided:
            return unguided_velocity(x, t, rope)
        if not cfg_truncation:
            return guided_velocity(x, t, rope)
        # past the cut the unconditional half is not run at all, as both references skip it: diffusers' cut is by
        # step, the original's by the model time of each call (a midpoint step's two calls may fall either side)
        return jax.lax.cond((i < guided_steps) & (t < cfg_trunc), guided_velocity, unguided_velocity, x, t, rope)

    def step(i, x):
        t, dt = times[i], steps[i]
        if solver == "euler":
            return x + dt * velocity(x, t, i)
        midpoint = x + 0.5 * dt * velocity(x, t, i)
        return x + dt * velocity(midpoint, t + 0.5 * dt, i)

    # first_step is traced: image-to-image at any strength runs the same program
    return jax.lax.fori_loop(first_step, times.shape[0], step, latents.astype(jnp.float32))


def sample(
    model: Transformer,
    latents: jax.Array,
    caption: jax.Array,
    caption_mask: jax.Array,
    schedule: FlowSchedule,
    options: SamplerOptions = SamplerOptions(),
    *,
    caption_regions: jax.Array | None = None,
) -> jax.Array:
    """Integrate the flow ODE from noise `latents` [B, C, h, w] to data latents (float32) over `schedule`,
    from its step `options.first_step` on (image-to-image: `FlowSchedule.image_to_image_start`).
    caption_regions [rows, tokens, L]: what each image token of each caption row attends to
    (`regions.regional_captions`).

    With options.guided, caption/caption_mask hold 2B rows, the conditional ones first; otherwise B rows.
    The options' schedule fields are not read here: `schedule` is the one they made (`LuminaPipeline.sample`).
    """
    args, static = _integrate_arguments(model, latents, caption, caption_mask, schedule, options, caption_regions)
    return _integrate(*args, **static)


def lower_sample(
    model: Transformer,
    latents,
    caption,
    caption_mask,
    schedule: FlowSchedule,
    options: SamplerOptions = SamplerOptions(),
    *,
    caption_regions=None,
) -> jax.stages.Lowered:
    """The program `sample` runs, lowered for arrays or ShapeDtypeStructs (with shardings) of these
    shapes and an abstract model (`nnx.eval_shape`), e.g. to compile it for a TPU without one."""
    args, static = _integrate_arguments(model, latents, caption, caption_mask, schedule, options, caption_regions)
    return _integrate.lower(*args, **static)


def _integrate_arguments(
    model, latents, caption, caption_mask, schedule: FlowSchedule, options: SamplerOptions, caption_regions
) -> tuple[tuple, dict]:
    """`_integrate`'s arguments: the options' traced values as arrays, the program's static choices."""
    if options.scaling_watershed is None:
        raise ValueError("scaling_watershed is None, the model family's: give one (LuminaPipeline.sample fills it in)")
    rows = latents.shape[0] * (2 if options.guided else 1)
    if caption_regions is not None and caption_regions.shape[0] != rows:
        raise ValueError(f"caption_regions has {caption_regions.shape[0]} rows for {rows} caption rows")
    if caption.shape[0] != rows or caption_mask.shape[0] != rows:
        raise ValueError(
            f"{'guidance doubles the batch: ' if options.guided else ''}expected {rows} caption rows for "
            f"{latents.shape[0]} latents, got {caption.shape[0]} embeddings and {caption_mask.shape[0]} masks"
        )
    _, channels, height, width = latents.shape
    num_steps = len(schedule.times)
    # diffusers' Lumina2Pipeline skips guidance at step i once (i + 1) / num_inference_steps > cfg_trunc_ratio
    guided_steps = sum((i + 1) / num_steps <= options.cfg_trunc_ratio for i in range(num_steps))
    graphdef, params = nnx.split(model)
    args = (
        graphdef,
        params,
        latents,
        caption,
        caption_mask,
        np.float32(options.guidance_scale),
        schedule.times,
        schedule.steps,
        np.float32(options.scaling_watershed),
        np.int32(options.first_step),
        np.int32(guided_steps),
        np.float32(options.cfg_trunc),
        np.float32(options.renorm_cfg),
        caption_regions,
    )
    static = dict(
        solver=options.solver,
        guided_channels=(channels if options.cfg_all_channels else GUIDED_CHANNELS) if options.guided else 0,
        base_sequence_length=model.config.base_sequence_length if options.proportional_attn else None,
        scale=resolution_scale(model, height, width),
        context_drop=options.context_drop,
        cfg_truncation=options.guided and (guided_steps < num_steps or options.cfg_trunc < 1),
        cfg_normalization=bool(options.cfg_normalization),
        capped=options.renorm_cfg > 0,
    )
    return args, static

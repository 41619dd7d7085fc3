"""The training step compiled for a TPU slice on a machine without one, without data or weights:
its bytes and FLOPs per chip (`lumina_jax.tpu`), and the largest per-chip batch that fits.

The step is the one `python -m train` runs, for the config's model, remat policy, mesh and
optimizer, on its one batch shape: the most tokens any crop size of `image_size` and `max_aspect`
gives (`batches.BatchShape`), and captions of the longest bucket; with a pooled loss, the pooled latents
that give the most tokens too. A run that draws samples while training (`sample_every`) has the
sampler's programs planned beside it, on the training mesh (`plan_samples`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lumina_jax import sharding, tpu
from lumina_jax.models.family import TransformerConfig
from lumina_jax.pipeline import CAPTION_BUCKETS, LuminaPipeline
from lumina_jax.training.checkpoint import abstract_train_state
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.data import crop_sizes
from lumina_jax.training.flops import train_step_flops
from lumina_jax.training.loop import abstract_transformer, make_run_optimizer
from lumina_jax.training.objective import pooled_latent_size
from lumina_jax.training.samples import images_per_call
from lumina_jax.training.step import TrainBatch, frozen_weights, train_step, trainable_split
from lumina_jax.weights.importer import resolve_dtype

EMPTY_CAPTION_TOKENS = 8  # the text encoder's tokens for "" (caption dropout), padded


def run_mesh(config: TrainConfig, devices) -> jax.sharding.Mesh:
    fsdp = None if config.mesh_fsdp == -1 else config.mesh_fsdp
    return sharding.make_mesh(config.mesh_data, fsdp, config.mesh_tensor, devices=devices)


def planned_model(config: TrainConfig) -> tuple[TransformerConfig, int]:
    """The transformer the run trains, and the pixels a latent's side takes. From config files alone: the
    pipeline's (a folder of them, or a released name), whose transformer/config.json a fine-tuning run
    starts from and whose VAE sets the latent size. A from-scratch run whose pipeline is not written yet
    (by `prepare`, as the digits config's) is planned in pixel space when its model has 1 (grey) or 3 (RGB)
    channels, as `cache.pipeline_encoders` feeds one without a VAE."""
    try:
        pipe = LuminaPipeline.abstract(config.pipeline, config.compute_dtype)
        return (config.transformer if config.init == "scratch" else pipe.transformer.config), pipe.latent_scale
    except FileNotFoundError:
        if config.init == "pretrained" or config.transformer.in_channels not in (1, 3):
            raise
        return config.transformer, 1


def planned_latents(config: TrainConfig) -> list[tuple[int, int]]:
    """The latent (height, width) of every crop size the run's images may take."""
    _, latent_scale = planned_model(config)
    crops = crop_sizes(config.image_size, max_aspect=config.max_aspect)
    return [(height // latent_scale, width // latent_scale) for height, width in crops]


def planned_step(config: TrainConfig) -> tuple[TransformerConfig, tuple[int, int], int]:
    """The transformer the run trains, and the latent (height, width) and caption tokens of the step planned:
    the crop size whose latents give the most tokens (every batch of the run is padded to those), captions
    of the longest bucket."""
    cfg, _ = planned_model(config)
    p = cfg.patch_size
    largest = max(planned_latents(config), key=lambda size: cfg.sequence_length(size[0] // p, size[1] // p))
    return cfg, largest, CAPTION_BUCKETS[-1]


def planned_pooled_latent(config: TrainConfig) -> tuple[int, int] | None:
    """The (height, width) of the pooled latents the planned step's pooled loss takes (`TrainConfig.
    pooled_loss_factor`): the crop size's whose pool gives the most tokens. None without that loss."""
    if not config.pooled_loss_factor:
        return None
    cfg, _ = planned_model(config)
    p = cfg.patch_size
    pooled = [pooled_latent_size(h, w, config.pooled_loss_factor, p) for h, w in planned_latents(config)]
    return max(pooled, key=lambda size: cfg.sequence_length(size[0] // p, size[1] // p))


def lower_train_step(
    config: TrainConfig, mesh: jax.sharding.Mesh, batch_size: int, *, unroll_layers: bool = False
) -> tuple[jax.stages.Lowered, int]:
    """The config's train step lowered for `batch_size` images (global) on the mesh; and the bytes per
    chip of its state (parameters, EMA and optimizer moments; with LoRA, the adapters' and the frozen
    transformer), resident across steps. unroll_layers:
    the layers in a Python loop, not a scan, for counting FLOPs (XLA counts a loop's body once)."""
    cfg, (height, width), caption = planned_step(config)
    model = abstract_transformer(config, cfg)
    model.scan_layers = model.scan_layers and not unroll_layers
    optimizer = make_run_optimizer(config)
    state = abstract_train_state(model, optimizer, mesh)
    frozen = frozen_weights(model)  # with LoRA: the transformer, in the compute dtype, resident too
    if frozen is not None:
        placements = sharding.parameter_shardings(frozen, mesh)
        frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen, placements)
    rows = sharding.batch_sharding(mesh)
    everywhere = NamedSharding(mesh, PartitionSpec())

    def struct(shape, dtype, where=rows):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

    def tokens(latent_height, latent_width):
        """The token sequence of a latent, as the family lays it out, shaped for the whole batch."""
        image = jax.ShapeDtypeStruct((cfg.in_channels, latent_height, latent_width), jnp.float32)
        sequence = jax.eval_shape(lambda image: cfg.token_sequence([image]), image)
        return [None if s is None else struct((batch_size, *s.shape[1:]), s.dtype) for s in sequence]

    patches, positions, token_mask, end_of_line = tokens(height, width)  # the largest crop's
    pooled_size = planned_pooled_latent(config)
    pooled = None
    if pooled_size is not None:
        pooled_patches, pooled_positions, pooled_mask, pooled_end_of_line = tokens(*pooled_size)
        pooled = TrainBatch(pooled_patches, pooled_positions, pooled_mask, None, None, pooled_end_of_line)
    batch = TrainBatch(
        patches=patches,
        positions=positions,
        token_mask=token_mask,
        caption=struct((batch_size, caption, cfg.cross_attention_dim), jnp.float32),
        caption_mask=struct((batch_size, caption), jnp.bool_),
        end_of_line=end_of_line,
        pooled=pooled,
    )
    empty = (
        struct((EMPTY_CAPTION_TOKENS, cfg.cross_attention_dim), jnp.float32, everywhere),
        struct((EMPTY_CAPTION_TOKENS,), jnp.bool_, everywhere),
    )
    lowered = train_step.lower(
        trainable_split(model)[0],
        state,
        batch,
        *empty,
        optimizer=optimizer,
        mesh=mesh,
        snr_type=config.snr_type,
        caption_dropout=np.float32(config.caption_dropout),
        time_shift=np.float32(config.time_shift),
        ema_decay=np.float32(config.ema_decay),
        frozen=frozen,
    )
    return lowered, tpu.per_chip_bytes(state) + (0 if frozen is None else tpu.per_chip_bytes(frozen))


def plan_samples(config: TrainConfig, target: tpu.TpuSlice) -> tpu.MemoryPlan | None:
    """The programs that draw the run's samples (`training.samples`), as `python -m sample --compile-only`
    plans them, on the training mesh: the text encoder and VAE resident (kept from the first sample on), the
    EMA's compute-dtype copy in the training state's sharding only while the sampler runs. None when the
    config draws no samples; FileNotFoundError when the pipeline's config files are not there (yet)."""
    if not config.sample_every:
        return None
    mesh = run_mesh(config, tpu.compile_devices(target))
    pipe = LuminaPipeline.abstract(config.pipeline, config.compute_dtype)
    cfg, _, _ = planned_step(config)
    model = abstract_transformer(config, cfg)
    compute = resolve_dtype(config.compute_dtype)

    def in_compute_dtype(x):
        return jax.ShapeDtypeStruct(x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)

    nnx.update(model, jax.tree.map(in_compute_dtype, nnx.state(model)))
    pipe.transformer = model  # the run's, cast as `SampleDrawer.compute_weights` casts the EMA
    pipe.shard(mesh)
    programs = pipe.lower(
        height=config.image_size,
        width=config.image_size,
        prompts=images_per_call(mesh),
        num_inference_steps=config.sample_steps,
        guidance_scale=config.sample_guidance,
    )
    encoders = {"text_encoder": pipe.text_encoder, "vae": pipe.vae}  # no VAE: pixel space
    return tpu.plan_programs(target, programs, {name: model for name, model in encoders.items() if model is not None})


def plan_train_step(
    config: TrainConfig,
    target: tpu.TpuSlice,
    per_chip_batch: int | None = None,
    *,
    count_flops: bool = True,
    samples: tpu.MemoryPlan | None = None,
) -> tpu.MemoryPlan:
    """The train step's plan for the slice with `per_chip_batch` images per batch shard (data x fsdp;
    default: the config's batch); with count_flops, the program's FLOPs per chip as XLA counts them: what
    remat recomputes and the elementwise work included, attention as XLA's dot products. With `samples`
    (`plan_samples`), their programs run beside the resident training state."""
    mesh = run_mesh(config, tpu.compile_devices(target))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % shards:
        raise ValueError(f"batch_size {config.batch_size} does not split over data x fsdp = {shards} devices")
    batch_size = config.batch_size if per_chip_batch is None else per_chip_batch * shards
    lowered, resident = lower_train_step(config, mesh, batch_size)
    # The state is donated: the step's arguments and its aliased outputs, resident between steps.
    step = tpu.compile_program("train_step", lowered, resident, "train_state")
    if count_flops:
        # Counted on one CPU device: a lowering for a TPU topology has no cost analysis, a fused attention
        # kernel would be opaque to it, and a loop's body counts once (so the layers are unrolled).
        cpu = sharding.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
        unrolled, _ = lower_train_step(config, cpu, batch_size, unroll_layers=True)
        flops = (unrolled.cost_analysis() or {}).get("flops")
        step = dataclasses.replace(step, flops=flops and flops / mesh.size)
    plan = tpu.MemoryPlan(target, {"train_state": resident}, [step])
    return plan if samples is None else plan.beside(samples)


def model_flops(config: TrainConfig) -> float:
    """The model FLOPs of the config's planned step (`training.flops`), which MFU counts."""
    cfg, (height, width), caption = planned_step(config)
    p = cfg.patch_size
    tokens = cfg.sequence_length(height // p, width // p)
    pooled_size = planned_pooled_latent(config)
    pooled_tokens = 0 if pooled_size is None else cfg.sequence_length(pooled_size[0] // p, pooled_size[1] // p)
    return train_step_flops(cfg, config.batch_size, tokens, caption, pooled_tokens)


def largest_per_chip_batch(
    config: TrainConfig, target: tpu.TpuSlice, log=None, samples: tpu.MemoryPlan | None = None
) -> int | None:
    """The most images per batch shard whose step fits (beside `samples`' programs, if given), by doubling
    then bisection; None if one does not."""
    fits: dict[int, bool] = {}

    def fits_with(per_chip: int) -> bool:
        if per_chip not in fits:
            plan = plan_train_step(config, target, per_chip, count_flops=False, samples=samples)
            fits[per_chip] = plan.fits
            if log:
                log(f"  {per_chip} per chip: {plan.peak_bytes / tpu.GiB:.2f} GiB, {'fits' if plan.fits else 'too big'}")
        return fits[per_chip]

    if not fits_with(1):
        return None
    low, high = 1, 2
    while fits_with(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits_with(middle) else (low, middle)
    return low

"""A training run from a `TrainConfig`: mesh, model, cached data, the compiled step, checkpoints, logs.

The run resumes from the newest checkpoint in workdir/checkpoints (parameters, EMA, optimizer
state, step, RNG and the data iterator's position), so a restarted run continues with exactly the
batches and random draws it would have seen. SIGTERM (preemption) saves and returns; non-finite
steps are skipped by the step itself, and the run stops after `max_consecutive_skips` in a row.
On one host or many: with several processes, `jax.distributed.initialize()` runs first and each
host loads its own rows of every global batch.
"""

import contextlib
import dataclasses
import importlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from lumina_jax import hub, sharding
from lumina_jax.models.family import Transformer, TransformerConfig
from lumina_jax.models.lora import add_adapters
from lumina_jax.peak_flops import PEAK_BF16_FLOPS
from lumina_jax.training import cache as latent_cache
from lumina_jax.training.batches import BatchShape, make_batches
from lumina_jax.training.checkpoint import Checkpointer, PreemptionWatcher, abstract_train_state
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.data import read_examples
from lumina_jax.training.flops import train_step_flops
from lumina_jax.training.run_log import RunLog
from lumina_jax.training.samples import SampleDrawer
from lumina_jax.training.step import (
    ClippedAdamW,
    LearningRate,
    TrainBatch,
    frozen_weights,
    init_train_state,
    train_step,
    trainable_split,
)
from lumina_jax.weights import orbax_io
from lumina_jax.weights.importer import resolve_dtype
from lumina_jax.weights.lora import LORA_WEIGHT_NAME, save_lora
from lumina_jax.weights.nextdit import (
    MODELS,
    TransformerCheckpoint,
    build_model,
    config_from_dict,
    find_checkpoint,
    save_transformer,
)

logger = logging.getLogger(__name__)

# The keys of a checkpoint's extra JSON holding the transformer's config (a resumed run is rebuilt from it) and
# the LoRA adapters' settings (None: every weight trains).
TRANSFORMER_RECORD = "transformer"
ADAPTERS_RECORD = "lora"


def adapter_settings(config: TrainConfig) -> dict | None:
    """What a LoRA run's checkpoints must agree with to be resumed: the adapters' shapes and scale."""
    if not config.lora_rank:
        return None
    return {"rank": config.lora_rank, "alpha": config.lora_alpha or config.lora_rank, "targets": config.lora_targets}


class TrainingStopped(RuntimeError):
    """The run could not go on (e.g. too many non-finite steps in a row)."""


@dataclasses.dataclass
class RunSummary:
    step: int  # steps done, skipped ones included
    preempted: bool
    skipped_steps: int
    seconds: float
    export: epath.Path | None
    start_step: int  # 0, or the step it resumed from (== step: nothing to train, the run only exported again)


def base_pipeline(config: TrainConfig) -> Path:
    """The config's pipeline folder: the local folder, or a hub id's snapshot in the Hugging Face cache."""
    return hub.local_path(config.pipeline, "pipeline")


def base_transformer(config: TrainConfig) -> TransformerCheckpoint | None:
    """The pipeline's transformer weights a new run fine-tunes, found (not read); None from scratch."""
    return None if config.init == "scratch" else find_checkpoint(base_pipeline(config) / "transformer")


def architecture(config: TrainConfig, base: TransformerCheckpoint | None = None) -> TransformerConfig:
    """The transformer a new run of `config` trains: the config's (from scratch), or the one in its pipeline's
    files (fine-tuning; `base`, when found already, else found again)."""
    if config.init == "scratch":
        return config.transformer
    return (base or base_transformer(config)).config


def saved_architecture(config: TrainConfig, checkpoints: Checkpointer, step: int | None = None) -> TransformerConfig:
    """The transformer a checkpoint of the run holds, as the run recorded it when saving; for checkpoints
    that predate that record, `architecture(config)`. A from-scratch config that now asks for another
    transformer is refused: its weights would not fit the saved ones; so is a config whose LoRA adapters
    (`adapter_settings`) are not the run's."""
    extra = checkpoints.extra(step)
    if extra.get(ADAPTERS_RECORD) != adapter_settings(config):
        saved, asked = extra.get(ADAPTERS_RECORD), adapter_settings(config)
        raise ValueError(
            f"{checkpoints.directory} holds a run with LoRA adapters {saved or 'none (every weight trained)'}; the "
            f"config asks for {asked or 'none'}: give the run's own lora_* settings, or another workdir to start over"
        )
    recorded = extra.get(TRANSFORMER_RECORD)
    if recorded is None:
        return architecture(config)
    saved = config_from_dict(recorded)
    if config.init == "scratch" and saved != config.transformer:
        raise ValueError(
            f"{checkpoints.directory} holds a run of another transformer than the config's ({saved} there, "
            f"{config.transformer} asked for); give the run's own transformer, or another workdir to start over"
        )
    return saved


def weights_dtype(config: TrainConfig) -> str:
    """The transformer's parameters: float32 master weights, or with LoRA frozen in the compute dtype."""
    return config.compute_dtype if config.lora_rank else "float32"


def transformer_factory(config: TrainConfig, transformer: TransformerConfig | None = None) -> Callable[[], Transformer]:
    """A function building `transformer` (default: `architecture(config)`) freshly initialised, without adapters:
    its weights in `weights_dtype`, the configured compute dtype."""
    compute, transformer = resolve_dtype(config.compute_dtype), transformer or architecture(config)
    params = resolve_dtype(weights_dtype(config))
    return lambda: MODELS[type(transformer)](
        transformer, dtype=compute, param_dtype=params, remat=config.remat, rngs=nnx.Rngs(config.seed)
    )


def with_adapters(config: TrainConfig, model: Transformer) -> Transformer:
    """The model with the config's new LoRA adapters (float32, `models.lora`), if it asks for any; in place. The
    model may be abstract (`nnx.eval_shape`): the adapters are made all the same."""
    settings = adapter_settings(config)
    if settings:
        key = jax.random.PRNGKey(config.seed)
        add_adapters(
            model, settings["targets"], settings["rank"], settings["alpha"], dropout=config.lora_dropout, key=key
        )
    return model


def abstract_transformer(config: TrainConfig, transformer: TransformerConfig | None = None) -> Transformer:
    """The run's transformer without its weights (`nnx.eval_shape`), with its adapters."""
    return with_adapters(config, nnx.eval_shape(transformer_factory(config, transformer)))


def initial_transformer(config: TrainConfig, mesh: Mesh, base: TransformerCheckpoint | None = None) -> Transformer:
    """The pipeline's transformer to fine-tune (`base`, when found already), or a new one, in `weights_dtype`;
    each parameter made or loaded straight into its sharding on the mesh; with the config's adapters."""
    if config.init == "pretrained":
        model = build_model(
            base or base_transformer(config),
            config.compute_dtype,
            param_dtype=weights_dtype(config),
            remat=config.remat,
            mesh=mesh,
            progress=False,
        )
    else:
        model = sharding.create_sharded(transformer_factory(config), mesh)
    return with_adapters(config, model)


def placed_frozen_weights(model: Transformer, mesh: Mesh) -> nnx.State | None:
    """`step.frozen_weights` of the model, laid out on the mesh (the adapters' scales are made unplaced)."""
    frozen = frozen_weights(model)
    return None if frozen is None else jax.device_put(frozen, sharding.parameter_shardings(frozen, mesh))


def make_run_optimizer(config: TrainConfig) -> ClippedAdamW:
    cosine_until = config.steps if config.lr_decay == "cosine" else None
    schedule = LearningRate(config.lr, config.warmup_steps, cosine_until)
    return ClippedAdamW(
        schedule, config.weight_decay, config.grad_clip, config.adam_b1, config.adam_b2, config.adam_eps
    )


def peak_flops(config: TrainConfig) -> float | None:
    return config.peak_flops or PEAK_BF16_FLOPS.get(jax.devices()[0].device_kind)


def global_batch(rows: TrainBatch, mesh) -> TrainBatch:
    """This host's rows (numpy, from `make_batches(tokens=...)`) as the global, sharded TrainBatch."""
    placement = sharding.batch_sharding(mesh)
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(placement, rows), rows)


def prepare_data(config: TrainConfig) -> None:
    """Run the config's `prepare` function, then encode the data into the cache if it is missing or
    unfinished (resuming where an interrupted encoding stopped).

    On every process of a multi-host run and every local device of each: a process encodes its share
    of the missing shards data-parallel over its own devices (the text encoder and VAE on each, as
    `python -m sample` places them), and all return once the cache is complete."""
    sharding.initialize_distributed()
    if config.prepare:  # on every process: each host may need its own copy of what it writes
        module, _, name = config.prepare.partition(":")
        getattr(importlib.import_module(module), name)(config)
    if (epath.Path(config.cache) / latent_cache.COMPLETE_FILE).exists():
        return
    # Read first: a data set that cannot be read stops the run before the encoders load.
    examples = read_examples(config.data, image_column=config.image_column, caption_column=config.caption_column)
    from lumina_jax.pipeline import LuminaPipeline

    devices = jax.local_devices()
    pipe = LuminaPipeline.from_pretrained(
        base_pipeline(config),
        dtype=config.compute_dtype,
        transformer=None,
        mesh=sharding.make_mesh(data=len(devices), devices=devices),
        progress=False,
    )
    base = base_transformer(config)  # the channels are config.json's: no tensor is read
    pixel_channels = (config.transformer if base is None else base.found_config).in_channels
    encoders = latent_cache.pipeline_encoders(pipe, pixel_channels=pixel_channels)
    encode_images, encode_text, scaling_factor, shift_factor = encoders
    latent_cache.build_cache(
        examples,
        config.cache,
        encode_images=encode_images,
        encode_text=encode_text,
        image_size=config.image_size,
        max_aspect=config.max_aspect,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        shard_size=config.cache_shard_size,
        batch_size=config.cache_batch_size * len(devices),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        barrier=multihost_utils.sync_global_devices if jax.process_count() > 1 else latent_cache.no_barrier,
    )


def export_destination(config: TrainConfig) -> epath.Path:
    """Where a run's end exports: WORKDIR/pipeline, or a LoRA run's adapters, WORKDIR/lora."""
    return epath.Path(config.workdir) / ("lora" if config.lora_rank else "pipeline")


def export_run(
    config: TrainConfig, graphdef, ema_params, frozen, destination: epath.Path, *, overwrite: bool = True
) -> epath.Path:
    """The EMA weights exported: a LoRA run's adapters as a PEFT LoRA file in the folder `destination`
    (`weights.lora.save_lora`), any other run's transformer as a pipeline folder (`export_pipeline`)."""
    if frozen is None:
        return export_pipeline(config, graphdef, ema_params, destination, overwrite=overwrite)
    model = nnx.merge(graphdef, jax.device_get(ema_params), frozen)
    keep = (base_pipeline(config), epath.Path(config.workdir) / "checkpoints")
    with orbax_io.atomic_folder(destination, overwrite=overwrite, keep=keep) as folder:
        save_lora(model, folder / LORA_WEIGHT_NAME)
    return destination


def export_pipeline(
    config: TrainConfig, graphdef, ema_params, destination: epath.Path, *, overwrite: bool = True
) -> epath.Path:
    """A pipeline folder: the base pipeline's other components with the EMA transformer in diffusers' layout
    (a Flag-DiT, which has none, in ours: `save_transformer`). With `overwrite` it replaces an earlier export
    (never a folder we did not write, the base pipeline or the checkpoints)."""
    model = nnx.merge(graphdef, jax.device_get(ema_params))
    base = base_pipeline(config)
    keep = (base, epath.Path(config.workdir) / "checkpoints")
    with orbax_io.atomic_folder(destination, overwrite=overwrite, keep=keep) as folder:
        for item in base.iterdir():
            if item.name != "transformer":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        save_transformer(model, folder / "transformer")
    return destination


def export_checkpoint(
    config: TrainConfig, destination: str | os.PathLike, step: int | None = None, *, overwrite: bool = False
) -> epath.Path:
    """The EMA weights of a saved step (default: the newest) as a pipeline folder, or a LoRA run's adapters as a
    PEFT LoRA file in the folder `destination`, e.g. mid-run."""
    orbax_io.check_destination(destination, overwrite=overwrite)  # before the restore
    with Checkpointer(epath.Path(config.workdir) / "checkpoints", read_only=True) as checkpoints:
        abstract = abstract_transformer(config, saved_architecture(config, checkpoints, step))
        state, _ = checkpoints.restore(abstract_train_state(abstract, make_run_optimizer(config)), step)
    # A LoRA file needs the adapters' scales of the frozen part, not the transformer's weights.
    graphdef, frozen = trainable_split(abstract)[0], frozen_weights(abstract)
    return export_run(config, graphdef, state.ema_params, frozen, epath.Path(destination), overwrite=overwrite)


def train(config: TrainConfig, *, progress: bool = True) -> RunSummary:
    sharding.initialize_distributed()
    workdir = epath.Path(config.workdir)  # local, or in a bucket (gs://...)
    drawer = SampleDrawer(config, workdir)  # checks the sample settings first
    orbax_io.check_destination(export_destination(config), overwrite=True)  # before any training
    workdir.mkdir(parents=True, exist_ok=True)
    # Whatever fails, from here on every resource opened is released (Orbax's threads, the log's files, the
    # SIGTERM handler), in reverse order.
    with contextlib.ExitStack() as resources:
        checkpoints = resources.enter_context(
            Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints, save_interval_steps=config.save_every)
        )
        resumed_at = checkpoints.latest_step()
        if resumed_at is not None and resumed_at > config.steps:
            raise ValueError(
                f"steps={config.steps}: nothing to train, {checkpoints.directory} is at step {resumed_at} already; "
                f"give steps above {resumed_at} to go on, or another workdir to start over"
            )
        prepare_data(config)
        cache = latent_cache.open_cache(config.cache)
        # A resumed run is rebuilt as it was saved; config.json records what is trained, whatever init says.
        base = base_transformer(config) if resumed_at is None else None  # found once, read once when built
        transformer = architecture(config, base) if resumed_at is None else saved_architecture(config, checkpoints)
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(dataclasses.replace(config, transformer=transformer).to_json())

        mesh = sharding.make_mesh(
            config.mesh_data, None if config.mesh_fsdp == -1 else config.mesh_fsdp, config.mesh_tensor
        )
        optimizer = make_run_optimizer(config)
        batches = make_batches(
            cache,
            global_batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            tokens=transformer,
            posterior=config.posterior,
            pooled_by=config.pooled_loss_factor,
        )
        frozen = None
        if resumed_at is None:
            model = initial_transformer(config, mesh, base)
            graphdef, state = init_train_state(model, optimizer, jax.random.PRNGKey(config.seed), mesh=mesh)
            frozen = placed_frozen_weights(model, mesh)
            del model
        else:  # restored straight onto this mesh, whatever mesh wrote it; the initial weights are never built
            abstract = abstract_transformer(config, transformer)
            graphdef = trainable_split(abstract)[0]
            if config.lora_rank:  # the checkpoint holds the adapters: the frozen transformer is the pipeline's
                frozen = placed_frozen_weights(initial_transformer(config, mesh), mesh)
            state, extra = checkpoints.restore(abstract_train_state(abstract, optimizer, mesh))
            batches.set_state(extra["data"])
            logger.info("resumed from step %d", int(state.step))
        empty = (jnp.asarray(cache.empty_caption), jnp.asarray(cache.empty_caption_mask))
        options = dict(optimizer=optimizer, mesh=mesh, snr_type=config.snr_type, frozen=frozen)
        hyper = dict(
            caption_dropout=jnp.float32(config.caption_dropout),
            time_shift=jnp.float32(config.time_shift),
            ema_decay=jnp.float32(config.ema_decay),
        )
        peak = peak_flops(config)
        shape = BatchShape.of(cache, transformer, config.pooled_loss_factor)
        logger.info(
            "every batch is padded to %d image and %d caption tokens a row, one compiled step; padding is %.1f%% "
            "of the image tokens and %.1f%% of the caption tokens",
            shape.image_tokens,
            shape.caption_tokens,
            100 * shape.image_padding,
            100 * shape.caption_padding,
        )
        if config.pooled_loss_factor:
            logger.info(
                "the pooled loss's latents are padded to %d tokens a row (%.1f%% padding)",
                shape.pooled_image_tokens,
                100 * shape.pooled_image_padding,
            )
        step_flops = train_step_flops(
            transformer, config.batch_size, shape.image_tokens, shape.caption_tokens, shape.pooled_image_tokens
        )

        start_step = int(state.step)
        log = resources.enter_context(contextlib.closing(RunLog(workdir)))
        watcher = resources.enter_context(PreemptionWatcher())
        bar = resources.enter_context(
            tqdm(total=config.steps, initial=start_step, desc="training", unit="step", disable=not progress)
        )
        pending, window_start, started = [], time.perf_counter(), time.perf_counter()

        def saved_extra() -> dict:  # what a checkpoint holds beside the state
            return {
                "data": batches.get_state(),
                TRANSFORMER_RECORD: transformer.to_dict(),
                ADAPTERS_RECORD: adapter_settings(config),
            }

        skipped, preempted, step = 0, False, start_step
        while step < config.steps:
            batch = global_batch(next(batches), mesh)
            state, metrics = train_step(graphdef, state, batch, *empty, **options, **hyper)
            step += 1
            pending.append(metrics)
            bar.update()
            if step % config.log_every == 0 or step == config.steps:
                seconds = time.perf_counter() - window_start
                skipped += _log_window(log, bar, pending, step, seconds, config, step_flops, peak)
                pending, window_start = [], time.perf_counter()
                run_of_skips = int(state.consecutive_skips)
                if run_of_skips >= config.max_consecutive_skips:
                    raise TrainingStopped(
                        f"step {step}: {run_of_skips} steps in a row had a non-finite loss or gradient (limit "
                        f"max_consecutive_skips={config.max_consecutive_skips}); the last good weights are in "
                        f"{checkpoints.directory}. Lower the learning rate or check the data."
                    )
            if watcher.should_stop(step):
                preempted = True
                break
            checkpoints.save(step, state, saved_extra())
            if drawer.due(step):
                log.samples(step, drawer.draw(step, graphdef, state.ema_params, frozen))
        checkpoints.save(step, state, saved_extra(), force=True)
        checkpoints.wait_until_finished()
    export = None
    if not preempted:
        ema = state.ema_params
        if jax.process_count() > 1:  # every process takes part in gathering the shards
            ema = multihost_utils.process_allgather(ema, tiled=True)
        if jax.process_index() == 0:
            export = export_run(config, graphdef, ema, frozen, export_destination(config))
    return RunSummary(step, preempted, skipped, time.perf_counter() - started, export, start_step)


def _log_window(log, bar, pending, step, seconds, config, step_flops, peak) -> int:
    """Write the mean metrics of the steps since the last log (each of `step_flops` model FLOPs); returns how
    many of them were skipped."""
    values = jax.device_get(pending)
    finite = [v for v in values if not v["skipped"]]
    steps_per_s = len(pending) / seconds
    record = {
        "step": step,
        "loss": float(np.mean([v["loss"] for v in finite])) if finite else float("nan"),
        "grad_norm": float(np.mean([v["grad_norm"] for v in finite])) if finite else float("nan"),
        "lr": float(values[-1]["lr"]),
        "skipped": len(values) - len(finite),
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * config.batch_size,
    }
    if "pooled_loss" in values[-1]:  # the pooled latents' share of the loss
        record["pooled_loss"] = float(np.mean([v["pooled_loss"] for v in finite])) if finite else float("nan")
    if peak:  # model FLOPs (`training.flops`), not what the program computes: remat and kernels do not count
        record["mfu"] = len(pending) * step_flops / seconds / (peak * jax.device_count())
    log.metrics(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", it_s=f"{steps_per_s:.2f}")
    return record["skipped"]

"""Samples while training: every `sample_every` steps the EMA weights draw the config's `sample_prompts`, one
image each with seed 0, into WORKDIR/samples/STEP/ (STEP in 8 digits), through what `python -m sample` runs.

The EMA weights are cast to the compute dtype, as `python -m sample` loads a transformer, and drawn on this
process's own devices (data-parallel, the transformer replicated on each) by `jobs.run_jobs`; with several
processes each draws its share of the prompts, so nothing is drawn twice. The text encoder and VAE are
loaded from the base pipeline once, at the first sample, and kept.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils

from lumina_jax import jobs, sharding
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.training.config import TrainConfig
from lumina_jax.weights.importer import resolve_dtype


class SampleDrawer:
    def __init__(self, config: TrainConfig, workdir: Path):
        if config.sample_every < 0 or (config.sample_every and not config.sample_prompts):
            raise ValueError(
                f"sample_every={config.sample_every}: expected 0 (no samples), or a positive number of steps "
                f"and sample_prompts, a list of prompts (got {config.sample_prompts!r})"
            )
        self.config, self.folder = config, workdir / "samples"
        size = config.image_size
        defaults = dict(
            negative_prompt=None,
            seed=0,
            height=size,
            width=size,
            guidance=config.sample_guidance,
            steps=config.sample_steps,
            num_images=1,
        )
        self.jobs = jobs.make_jobs([{"prompt": prompt} for prompt in config.sample_prompts], defaults)
        devices = jax.local_devices()
        self.mesh = sharding.make_mesh(data=len(devices), devices=devices)
        self.encoders: LuminaPipeline | None = None

    def due(self, step: int) -> bool:
        return self.config.sample_every > 0 and step % self.config.sample_every == 0

    def draw(self, step: int, graphdef, ema_params) -> list[Path]:
        """Draw the samples of `step` (on every process together); returns all the step's image files, in
        prompt order, once every process has written its own."""
        if jax.process_count() > 1:  # each process gathers the whole EMA: it draws on its own devices
            ema_params = multihost_utils.process_allgather(ema_params, tiled=True)
        compute = resolve_dtype(self.config.compute_dtype)
        ema_params = jax.tree.map(
            lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x, ema_params
        )
        if self.encoders is None:
            self.encoders = LuminaPipeline.from_pretrained(
                self.config.pipeline, self.config.compute_dtype, transformer=None, mesh=self.mesh, progress=False
            )
        encoders = self.encoders
        pipe = LuminaPipeline(
            nnx.merge(graphdef, ema_params),
            encoders.text_encoder,
            encoders.vae,
            encoders.tokenizer,
            scheduler_shift=encoders.scheduler_shift,
        ).shard(self.mesh)
        out = self.folder / f"{step:08d}"
        jobs.run_jobs(
            pipe,
            self.jobs,
            out,
            per_call=len(self.mesh.devices.flat),
            metadata={"step": step},
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            progress=False,
        )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"samples {step}")
        return [out / job.file_name for job in self.jobs]

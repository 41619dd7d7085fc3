"""Samples while training: every `sample_every` steps the EMA weights draw the config's `sample_prompts`, one
image each with seed 0, into WORKDIR/samples/STEP/ (STEP in 8 digits), through what `python -m sample` runs.

They are drawn on the training mesh: the EMA weights cast to the compute dtype (as `python -m sample` loads a
transformer) where their shards lie, in the training state's sharding, so no chip holds more than its share;
the text encoder and VAE, loaded from the base pipeline at the first sample and kept, placed on the mesh as
the pipeline places them (`LuminaPipeline.shard`). Each call draws one image per device of the batch axes.
With several processes the mesh spans them all: every process makes the same calls on the global arrays,
and process 0 writes the files (into a workdir in a bucket: drawn in a local folder, then uploaded).
`python -m train --compile-only` plans these programs beside the step.
"""

import contextlib
import math
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lumina_jax import jobs, sharding
from lumina_jax.buckets import is_remote
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.training.config import TrainConfig
from lumina_jax.weights.importer import resolve_dtype


def training_mesh(params) -> Mesh:
    """The mesh the training state's arrays lie on."""
    return jax.tree.leaves(params)[0].sharding.mesh


def images_per_call(mesh: Mesh) -> int:
    """One image per device of the mesh's batch axes: the images split over them, the weights over the rest."""
    return math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)


class SampleDrawer:
    def __init__(self, config: TrainConfig, workdir: epath.Path):
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
        self.encoders: LuminaPipeline | None = None  # loaded at the first sample, on the training mesh
        self._cast = None  # jitted at the first sample, for the EMA's shardings

    def due(self, step: int) -> bool:
        return self.config.sample_every > 0 and step % self.config.sample_every == 0

    def compute_weights(self, ema_params):
        """The EMA weights in the compute dtype, each shard cast on its own device: in the training state's
        sharding, never a whole copy on a chip."""
        if self._cast is None:
            compute = resolve_dtype(self.config.compute_dtype)
            cast = lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
            shardings = jax.tree.map(lambda x: x.sharding, ema_params)
            self._cast = jax.jit(lambda params: jax.tree.map(cast, params), out_shardings=shardings)
        return self._cast(ema_params)

    def pipeline(self, graphdef, ema_params, frozen=None) -> LuminaPipeline:
        """The base pipeline's text encoder and VAE (loaded once) with the EMA transformer (or the frozen one with
        the EMA adapters, their dropout off), on the EMA's mesh."""
        mesh = training_mesh(ema_params)
        if self.encoders is None:
            self.encoders = LuminaPipeline.from_pretrained(
                self.config.pipeline, self.config.compute_dtype, transformer=None, mesh=mesh, progress=False
            )
        encoders = self.encoders
        weights = [self.compute_weights(ema_params)] + ([] if frozen is None else [frozen])
        transformer = nnx.merge(graphdef, *weights)
        transformer.eval()
        return LuminaPipeline(
            transformer,
            encoders.text_encoder,
            encoders.vae,
            encoders.tokenizer,
            scheduler_shift=encoders.scheduler_shift,
        ).shard(mesh)  # every weight is in place already: this tells the pipeline its mesh

    def draw(self, step: int, graphdef, ema_params, frozen=None) -> list[epath.Path]:
        """Draw the samples of `step` (on every process together); returns the step's image files, in prompt
        order, once process 0 has written them. frozen: the transformer beside EMA adapters (`step.frozen_weights`)."""
        out = self.folder / f"{step:08d}"
        # jobs renames each image into place on disk; for a bucket it draws into a local folder, then uploads
        writes = jax.process_index() == 0
        with tempfile.TemporaryDirectory() if is_remote(out) else contextlib.nullcontext(out) as drawn:
            jobs.run_jobs(
                self.pipeline(graphdef, ema_params, frozen),
                self.jobs,
                Path(drawn),
                per_call=images_per_call(training_mesh(ema_params)),
                metadata={"step": step},
                progress=False,
                write=writes,
            )
            if writes and is_remote(out):
                for file in Path(drawn).iterdir():
                    (out / file.name).write_bytes(file.read_bytes())
        if jax.process_count() > 1:  # the files are there for whoever reads them next
            multihost_utils.sync_global_devices(f"samples {step}")
        return [out / job.file_name for job in self.jobs]

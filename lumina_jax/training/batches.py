"""Training batches from a latent cache: one latent shape per batch, deterministic and checkpointable.

Each epoch, the examples of every latent-shape bucket are shuffled and cut into global batches (a
bucket's remainder is dropped), and the order of all those batches is shuffled, seeded by
(seed, epoch). Batches never end: batch i is a pure function of (cache, seed, i), including its
posterior sample (noise seeded by (seed, i, example)), so a Grain iterator restored from
`get_state()` continues with exactly the batches an uninterrupted one would give. With several
processes, process p gets rows [p * b, (p + 1) * b) of each global batch, b = global_batch_size //
process_count, and every process pads captions to the same length.
"""

import functools
import sys

import grain
import numpy as np

from lumina_jax.models.family import TransformerConfig
from lumina_jax.pipeline import caption_bucket
from lumina_jax.training.cache import LatentCache
from lumina_jax.training.step import TrainBatch

_SHUFFLE, _POSTERIOR = 0, 1  # keep the two random streams apart


class BatchPlan:
    """Which cache examples make up each global batch."""

    def __init__(self, latent_shapes: list[tuple[int, ...]], global_batch_size: int, seed: int):
        by_shape = {}
        for index, shape in enumerate(latent_shapes):
            by_shape.setdefault(shape, []).append(index)
        self.buckets = [np.array(by_shape[shape]) for shape in sorted(by_shape)]
        self.global_batch_size, self.seed = global_batch_size, seed
        self.epoch = functools.lru_cache(maxsize=4)(self._epoch)  # the few epochs being read at once, per plan
        self.batches_per_epoch = sum(len(b) // global_batch_size for b in self.buckets)
        if self.batches_per_epoch == 0:
            sizes = ", ".join(f"{len(b)} of latent shape {shape}" for b, shape in zip(self.buckets, sorted(by_shape)))
            raise ValueError(
                f"no latent-shape bucket holds a full global batch of {global_batch_size} examples "
                f"(buckets: {sizes or 'none, the cache is empty'}); lower the batch size or add images"
            )

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        """The global batches of `epoch`, in order."""
        rng = np.random.default_rng([self.seed, _SHUFFLE, epoch])
        batches = []
        for bucket in self.buckets:
            shuffled = rng.permutation(bucket)
            usable = len(shuffled) - len(shuffled) % self.global_batch_size
            batches.extend(shuffled[:usable].reshape(-1, self.global_batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def __call__(self, step: int) -> np.ndarray:
        """The cache indices of global batch `step`."""
        return self.epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]


def load_batch(cache: LatentCache, plan: BatchPlan, step: int, rows: slice) -> dict[str, np.ndarray]:
    """This process's `rows` of global batch `step`: scaled latent samples and padded captions."""
    indices = plan(step)
    length = caption_bucket(int(cache.caption_lengths[indices].max()))
    latents, captions, masks = [], [], []
    for index in indices[rows]:
        item = cache[int(index)]
        latent = item["mean"]
        if "logvar" in item:
            noise = np.random.default_rng([plan.seed, _POSTERIOR, step, index]).standard_normal(
                latent.shape, np.float32
            )
            latent = latent + np.exp(0.5 * item["logvar"]) * noise
        latents.append((latent - cache.shift_factor) * cache.scaling_factor)
        caption = item["caption"]
        captions.append(np.pad(caption, ((0, length - len(caption)), (0, 0))))
        masks.append(np.arange(length) < len(caption))
    return {
        "latents": np.stack(latents).astype(np.float32),
        "caption": np.stack(captions).astype(np.float32),
        "caption_mask": np.stack(masks),
    }


def host_tokens(batch: dict[str, np.ndarray], transformer: TransformerConfig) -> TrainBatch:
    """A batch of `load_batch` as the transformer's tokens, numpy arrays made on the host."""
    return TrainBatch.from_latents(list(batch["latents"]), batch["caption"], batch["caption_mask"], transformer)


def make_batches(
    cache: LatentCache,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    prefetch: int = 8,
    tokens: TransformerConfig | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of this process's share of each global batch: {"latents" [b, C, H, W]
    float32, "caption" [b, L, D] float32, "caption_mask" [b, L] bool}, b = global_batch_size //
    process_count, L the longest caption of the global batch rounded up to 32, 64, 128 or 256; or,
    given the transformer's config as `tokens`, that share as a `TrainBatch` of numpy arrays.

    Batches are read and assembled by `num_threads` threads, `prefetch` ahead of the training step (which
    they never wait for: they are numpy). The iterator's `get_state()` is a small JSON-serialisable dict;
    `set_state(state)` on a fresh iterator resumes from it.
    """
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size must be a positive multiple of process_count ({process_count}), got {global_batch_size}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    plan = BatchPlan(cache.latent_shapes, global_batch_size, seed)
    per_process = global_batch_size // process_count
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    steps = grain.MapDataset.range(sys.maxsize)  # endless: step i is read as batch i
    batches = steps.map(functools.partial(load_batch, cache, plan, rows=rows))
    if tokens is not None:
        batches = batches.map(functools.partial(host_tokens, transformer=tokens))
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

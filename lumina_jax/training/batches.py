"""Training batches from a latent cache: one latent shape per batch, deterministic and checkpointable.

Each epoch, the examples of every latent-shape bucket are shuffled and cut into global batches (a
bucket's remainder is dropped), and the order of all those batches is shuffled, seeded by
(seed, epoch). Batches never end: batch i is a pure function of (cache, seed, i), including its
posterior sample (noise seeded by (seed, i, example)), so a Grain iterator restored from
`get_state()` continues with exactly the batches an uninterrupted one would give. With several
processes, process p gets rows [p * b, (p + 1) * b) of each global batch, b = global_batch_size //
process_count.

Every batch of a run has one shape (`BatchShape`): captions padded to the bucket of the cache's longest,
and, as tokens, images padded to the most tokens any latent shape of the cache gives (their pooled copies,
for a run with a pooled loss, likewise). So a run of any number of crop sizes compiles one train step;
padding is masked out of attention and the loss.
"""

import dataclasses
import functools
import sys
from typing import Literal

import grain
import numpy as np

from lumina_jax.models.family import TransformerConfig
from lumina_jax.pipeline import caption_bucket
from lumina_jax.training.cache import LatentCache
from lumina_jax.training.objective import pooled_latent_size
from lumina_jax.training.step import TrainBatch

_SHUFFLE, _POSTERIOR = 0, 1  # keep the two random streams apart
# How a batch takes latents from the cached VAE posteriors: a sample (the Lumina-T2X trainers'
# `latent_dist.sample()`) or the mean (Lumina-Image 2.0's `latent_dist.mode()`).
Posterior = Literal["sample", "mean"]
POSTERIORS = ("sample", "mean")


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


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The one shape every batch of a run is padded to, and the share of padding in it over the cache's
    examples (an epoch, less each bucket's remainder)."""

    image_tokens: int  # the most tokens a latent shape of the cache gives in the transformer's sequence
    caption_tokens: int  # the bucket of the cache's longest caption
    image_padding: float
    caption_padding: float
    pooled_image_tokens: int = 0  # the same for the latents pooled by `pooled_by` (0: no pooled loss)
    pooled_image_padding: float = 0.0

    @classmethod
    def of(cls, cache: LatentCache, transformer: TransformerConfig, pooled_by: int = 0) -> "BatchShape":
        p = transformer.patch_size
        shapes = [(h, w) for _, h, w in cache.latent_shapes]
        tokens = np.array([transformer.sequence_length(h // p, w // p) for h, w in shapes])
        captions = caption_tokens(cache)
        shape = cls(
            image_tokens=int(tokens.max()),
            caption_tokens=captions,
            image_padding=1 - float(tokens.mean() / tokens.max()),
            caption_padding=1 - float(cache.caption_lengths.mean() / captions),
        )
        if not pooled_by:
            return shape
        pooled = [pooled_latent_size(h, w, pooled_by, p) for h, w in shapes]
        empty = sorted({shape for shape, (h, w) in zip(shapes, pooled) if h == 0 or w == 0})
        if empty:
            raise ValueError(
                f"pooled_loss_factor={pooled_by}: latents of shape {', '.join(map(str, empty))} in the cache "
                f"{cache.folder} pool to less than one {p}x{p} patch; lower the factor, set it to 0, or train "
                "larger images"
            )
        pooled_tokens = np.array([transformer.sequence_length(h // p, w // p) for h, w in pooled])
        return dataclasses.replace(
            shape,
            pooled_image_tokens=int(pooled_tokens.max()),
            pooled_image_padding=1 - float(pooled_tokens.mean() / pooled_tokens.max()),
        )


def caption_tokens(cache: LatentCache) -> int:
    """The caption length of every batch: the bucket of the cache's longest caption."""
    return caption_bucket(int(cache.caption_lengths.max()))


def load_batch(
    cache: LatentCache,
    plan: BatchPlan,
    step: int,
    rows: slice,
    caption_length: int | None = None,
    posterior: Posterior = "sample",
) -> dict[str, np.ndarray]:
    """This process's `rows` of global batch `step`: scaled latents, a sample of each VAE posterior or its
    mean (`posterior`), and captions padded to the run's `caption_tokens` (`caption_length`, when the caller
    has it: a scan of every caption a batch otherwise)."""
    length = caption_length or caption_tokens(cache)
    latents, captions, masks = [], [], []
    for index in plan(step)[rows]:
        item = cache[int(index)]
        latent = item["mean"]
        if "logvar" in item and posterior == "sample":
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


def host_tokens(
    batch: dict[str, np.ndarray], transformer: TransformerConfig, shape: BatchShape, pooled_by: int = 0
) -> TrainBatch:
    """A batch of `load_batch` as the transformer's tokens padded to the run's `shape` (with pooled_by, its
    pooled copy too), numpy arrays made on the host."""
    return TrainBatch.from_latents(
        list(batch["latents"]),
        batch["caption"],
        batch["caption_mask"],
        transformer,
        shape.image_tokens,
        pooled_by=pooled_by,
        pooled_length=shape.pooled_image_tokens,
    )


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
    posterior: Posterior = "sample",
    pooled_by: int = 0,
) -> grain.DatasetIterator:
    """An endless iterator of this process's share of each global batch: {"latents" [b, C, H, W]
    float32, "caption" [b, L, D] float32, "caption_mask" [b, L] bool}, b = global_batch_size //
    process_count, L the cache's longest caption rounded up to 32, 64, 128 or 256; or, given the
    transformer's config as `tokens`, that share as a `TrainBatch` of numpy arrays, of
    `BatchShape.of(cache, tokens, pooled_by).image_tokens` tokens (with pooled_by, the latents average-pooled
    by it as `TrainBatch.pooled`). posterior: a sample of each latent's VAE posterior, or its mean.

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
    if posterior not in POSTERIORS:
        raise ValueError(f"unknown posterior {posterior!r}; choose one of {POSTERIORS}")
    if pooled_by and tokens is None:
        raise ValueError("pooled_by pools the latents of token batches: give the transformer's config as tokens")
    plan = BatchPlan(cache.latent_shapes, global_batch_size, seed)
    per_process = global_batch_size // process_count
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    steps = grain.MapDataset.range(sys.maxsize)  # endless: step i is read as batch i
    length = caption_tokens(cache)
    batches = steps.map(
        functools.partial(load_batch, cache, plan, rows=rows, caption_length=length, posterior=posterior)
    )
    if tokens is not None:
        shape = BatchShape.of(cache, tokens, pooled_by)
        batches = batches.map(functools.partial(host_tokens, transformer=tokens, shape=shape, pooled_by=pooled_by))
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

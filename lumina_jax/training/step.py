"""One training step of Next-DiT: the original trainer's recipe as a single compiled program.

float32 master weights with the model's compute dtype (bfloat16 for training: build the model with
`param_dtype=jnp.float32, dtype=jnp.bfloat16, remat="full"`), AdamW (lr 1e-4, weight decay 0) after
clipping the global gradient norm to 2, an EMA of the weights with decay 0.9999. A step whose loss
or gradients are not finite changes no weights, optimizer state or EMA and is counted instead.

With low-rank adapters on the model (`models.lora`), only they train: the state holds the adapters, their
EMA and their optimizer moments, and the rest of the model (`frozen_weights`, in the compute dtype) is
an argument of the step that it reads and never changes.

Batches are in the padded-token form, so one batch may hold images of different sizes. With a
mesh, the state is laid out by `sharding.parameter_shardings` and the batch by `batch_sharding`;
without one, the same code runs on one device.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from lumina_jax.models.family import Transformer, TransformerConfig
from lumina_jax.models.lora import reseed_dropout
from lumina_jax.sharding import batch_sharding, parameter_shardings
from lumina_jax.training.objective import (
    CAPTION_DROPOUT,
    SnrType,
    average_pool,
    drop_captions,
    interpolate,
    sample_timesteps,
    velocity_loss,
)

# The original trainer's recipe, and `TrainConfig`'s defaults.
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0
GRAD_CLIP = 2.0
EMA_DECAY = 0.9999
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
# The adapters' dropout masks, and the pooled loss's times and noise, are drawn from the step's key folded with
# these, beside its three split keys.
ADAPTER_DROPOUT_STREAM = 3
POOLED_LOSS_STREAM = 4


@struct.dataclass
class TrainBatch:
    """Data latents as patch tokens, for images of one or several sizes, in the family's token sequence
    (`TransformerConfig.token_sequence`): Next-DiT's patches with their grid positions, Flag-DiT's rows of
    patches, each closed by an end-of-line slot."""

    patches: jax.Array  # [B, T, C*p*p] latents x1, features ordered (c, ph, pw) as `patchify` writes them
    positions: jax.Array | None  # Next-DiT: [B, T, 2] (row, column) of each token; padding repeats the last
    token_mask: jax.Array  # [B, T] bool, False for padding
    caption: jax.Array  # [B, L, D] text-encoder features
    caption_mask: jax.Array  # [B, L]
    end_of_line: jax.Array | None = None  # Flag-DiT: [B, T] bool, its end-of-line slots (not in the loss)
    # The same latents average-pooled, for a second loss (`train_step`); its tokens only (caption None): the
    # captions are this batch's.
    pooled: "TrainBatch | None" = None

    @classmethod
    def from_latents(
        cls,
        latents: list[jax.Array],
        caption,
        caption_mask,
        config: TransformerConfig,
        length: int | None = None,
        *,
        pooled_by: int = 0,
        pooled_length: int | None = None,
    ) -> "TrainBatch":
        """Latents [C, H_i, W_i] (sizes may differ) and their captions [B, L, D], masks [B, L], as tokens of
        the transformer `config` describes, padded to the longest image's or to `length` tokens; with
        pooled_by, also the latents `objective.average_pool`ed by it, padded to `pooled_length`. Numpy
        latents give a batch of numpy arrays, assembled on the host without waiting for the device; JAX
        arrays a batch of JAX arrays."""
        xp = latents[0].__array_namespace__()
        patches, positions, token_mask, end_of_line = config.token_sequence(latents, length)
        pooled = None
        if pooled_by:
            pooled_latents = [average_pool(latent, pooled_by, config.patch_size) for latent in latents]
            pooled_patches, pooled_positions, pooled_mask, pooled_end_of_line = config.token_sequence(
                pooled_latents, pooled_length
            )
            pooled = cls(pooled_patches, pooled_positions, pooled_mask, None, None, pooled_end_of_line)
        caption, caption_mask = xp.asarray(caption), xp.asarray(caption_mask)
        return cls(patches, positions, token_mask, caption, caption_mask, end_of_line, pooled)

    @property
    def loss_mask(self) -> jax.Array:
        """[B, T] the tokens whose velocity is learned: the images' own patches."""
        return self.token_mask if self.end_of_line is None else self.token_mask & ~self.end_of_line


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; `train_step` donates it."""

    params: nnx.State  # float32 master weights
    ema_params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # batches seen, skipped ones included; step k draws its randomness from fold_in(rng, k)
    rng: jax.Array  # a raw uint32 key, so checkpoints hold plain arrays
    consecutive_skips: jax.Array  # non-finite steps in a row, 0 after a good one


# b1, b2 and eps static: the optimizer state holds the learning rate, weight decay and clip only, as before they
# were settable, so earlier checkpoints restore.
@functools.partial(optax.inject_hyperparams, static_args=("b1", "b2", "eps"))
def _clipped_adamw(learning_rate, weight_decay, clip, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS):
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay)
    )


@dataclasses.dataclass(frozen=True)
class LearningRate:
    """`peak` after a linear warm-up over `warmup` steps whose first step already learns (peak / warmup),
    then constant, or down to 0 at step `cosine_until` along a cosine. A value, not a closure: equal
    schedules give equal optimizers, so runs in one process share their compiled steps."""

    peak: float
    warmup: int = 0
    cosine_until: int | None = None

    def __call__(self, count: jax.Array) -> jax.Array:
        rate = self.peak * jnp.minimum(1.0, (count + 1) / max(self.warmup, 1))
        if self.cosine_until is None:
            return rate
        progress = jnp.clip((count - self.warmup) / max(self.cosine_until - self.warmup, 1), 0.0, 1.0)
        return rate * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


@dataclasses.dataclass(frozen=True)
class _AtRunStep:
    """A schedule of the run's step (`TrainState.step`, which `train_step` gives the optimizer's update as
    `step`) in optax's stateful-schedule form. Not optax's own count: a skipped step does not advance it."""

    schedule: optax.Schedule

    def init(self) -> dict:
        # Unused, but the leaf optax's own count schedule keeps: checkpoints of either restore into the other.
        return {"count": jnp.zeros([], jnp.int32)}

    def update(self, state: dict, **extra_args) -> dict:
        return state

    def __call__(self, state, step=0, **extra_args) -> jax.Array:
        return self.schedule(step)


@dataclasses.dataclass(frozen=True)
class ClippedAdamW:
    """AdamW after global-norm gradient clipping, as a value: `train_step` takes it as a static argument,
    so equal settings (a second run in one process: a test, a notebook) reuse the compiled step, and
    nothing outside the run's own references keeps it alive. The learning rate (a number or a hashable
    schedule of the run's step, e.g. `LearningRate`) is kept in the optimizer state, where `train_step`
    reads it."""

    lr: float | optax.Schedule = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    clip: float = GRAD_CLIP
    # torch.optim.AdamW's defaults, as the Lumina-Next and Lumina-T2I trainers use it (Lumina-Image 2.0's: 0.95, 1e-15)
    b1: float = ADAM_B1
    b2: float = ADAM_B2
    eps: float = ADAM_EPS

    @property
    def transformation(self) -> optax.GradientTransformationExtraArgs:
        lr = _AtRunStep(self.lr) if callable(self.lr) else self.lr
        return _clipped_adamw(
            learning_rate=lr, weight_decay=self.weight_decay, clip=self.clip, b1=self.b1, b2=self.b2, eps=self.eps
        )

    def init(self, params) -> optax.OptState:
        return self.transformation.init(params)

    def update(self, updates, state, params=None, **extra_args):
        return self.transformation.update(updates, state, params, **extra_args)


def ema_update(ema_params, params, decay: float | jax.Array = EMA_DECAY):
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)


def has_adapters(model: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def trainable_split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and what training changes: its adapters where it has any, else all its parameters."""
    if has_adapters(model):
        graphdef, adapters, _ = nnx.split(model, nnx.LoRAParam, ...)
        return graphdef, adapters
    return nnx.split(model)


def frozen_weights(model: nnx.Module) -> nnx.State | None:
    """What `train_step` reads beside the trained adapters (`frozen`): the rest of a model with adapters;
    None for a model without, all of which trains."""
    return nnx.split(model, nnx.LoRAParam, ...)[2] if has_adapters(model) else None


def init_train_state(
    model: Transformer, optimizer: optax.GradientTransformation, rng: jax.Array, *, mesh: Mesh | None = None
) -> tuple[nnx.GraphDef, TrainState]:
    """The model's graph and a fresh training state holding float32 copies of what trains (`trainable_split`).

    rng is a raw key (`jax.random.PRNGKey`). With a mesh the state is created already sharded.
    """
    graphdef, params = trainable_split(model)
    not_float32 = sorted({str(x.dtype) for x in jax.tree.leaves(params)} - {"float32"})
    if not_float32:
        raise ValueError(f"training keeps float32 master weights; the model has {not_float32} parameters")

    def build(params):
        return TrainState(
            params=jax.tree.map(jnp.copy, params),
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jnp.asarray(rng, jnp.uint32),
            consecutive_skips=jnp.zeros((), jnp.int32),
        )

    shardings = None if mesh is None else parameter_shardings(jax.eval_shape(build, params), mesh)
    return graphdef, jax.jit(build, out_shardings=shardings)(params)


def predict_velocity(
    model: Transformer, patches, positions, token_mask, t, caption, caption_mask, end_of_line=None
) -> jax.Array:
    """The model's velocity for patch tokens [B, T, C*p*p], in the tokens' own feature order (c, ph, pw):
    `forward_sequence` on the family's token sequence (`TrainBatch`'s fields), which the original trainers
    train without proportional attention."""
    cfg = model.config
    out = model.forward_sequence(patches, positions, token_mask, end_of_line, t, caption, caption_mask)
    batch, tokens, _ = out.shape
    # Output features read (ph, pw, c); learn_sigma's extra channels are not trained, as in the original.
    out = out.reshape(batch, tokens, cfg.patch_size**2, cfg.out_channels)[..., : cfg.in_channels]
    return out.transpose(0, 1, 3, 2).reshape(batch, tokens, -1)


def noise_like(key: jax.Array, patches: jax.Array) -> jax.Array:
    """Standard normal noise [B, T, F] for patch tokens [B, T, F], the same for a row's first tokens however
    many pad tokens follow: a key per row, and jax_threefry_partitionable (JAX's default) draws an array's
    elements by their index, so a batch padded to the run's shape gets the noise of the per-shape batch."""
    rows = jax.random.split(key, patches.shape[0])
    return jax.vmap(lambda row: jax.random.normal(row, patches.shape[1:], jnp.float32))(rows)


def flow_loss(graphdef, params, batch: TrainBatch, t, noise, caption, caption_mask, frozen=None) -> jax.Array:
    """The velocity loss of the model on a batch at times t [B] with noise shaped like batch.patches; params
    are the adapters when `frozen` holds the rest."""
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    noisy, target = interpolate(noise, batch.patches, t)
    prediction = predict_velocity(
        model, noisy, batch.positions, batch.token_mask, t, caption, caption_mask, batch.end_of_line
    )
    return velocity_loss(prediction, target, batch.loss_mask)


# jax.jit over the split model (nnx.jit walks the module graph every call); the state is donated
# so the new one reuses its buffers.
@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "mesh", "snr_type"), donate_argnames=("state",))
def train_step(
    graphdef: nnx.GraphDef,
    state: TrainState,
    batch: TrainBatch,
    empty_caption: jax.Array,
    empty_caption_mask: jax.Array,
    *,
    optimizer: ClippedAdamW,
    mesh: Mesh | None = None,
    caption_dropout: float | jax.Array = CAPTION_DROPOUT,
    snr_type: SnrType = "uniform",
    time_shift: float | jax.Array = 1.0,
    ema_decay: float | jax.Array = EMA_DECAY,
    frozen: nnx.State | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; returns the new state and metrics (loss, grad_norm before clipping, lr, skipped; with
    `batch.pooled`, pooled_loss: the pooled latents' share of the loss, which adds it as Lumina-Image 2.0's
    trainer adds its 256-px loss).

    empty_caption [L_e, D] and empty_caption_mask [L_e] are the text encoder's output for "", which
    replaces a caption with probability caption_dropout. optimizer is a `ClippedAdamW`.
    time_shift moves the sampled times towards the noise (`objective.sample_timesteps`). caption_dropout,
    time_shift and ema_decay, when given, are traced: other values reuse the compiled step. frozen: the
    model's weights that do not train when the state holds its adapters (`frozen_weights`).
    """
    if mesh is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))
    step_key = jax.random.fold_in(state.rng, state.step)
    t_key, noise_key, caption_key = jax.random.split(step_key, 3)
    if frozen is not None:  # the adapters' dropout masks of this step, drawn in the frozen part's keys
        model = nnx.merge(graphdef, state.params, frozen)
        reseed_dropout(model, jax.random.fold_in(step_key, ADAPTER_DROPOUT_STREAM))
        frozen = nnx.split(model, nnx.LoRAParam, ...)[2]
    t = sample_timesteps(t_key, batch.patches.shape[0], snr_type, time_shift)
    noise = noise_like(noise_key, batch.patches)
    caption, caption_mask = drop_captions(
        caption_key, batch.caption, batch.caption_mask, empty_caption, empty_caption_mask, caption_dropout
    )

    def loss_of(params):
        """The loss, and apart the pooled latents' share of it: their own times and noise, the same captions."""
        loss = flow_loss(graphdef, params, batch, t, noise, caption, caption_mask, frozen)
        if batch.pooled is None:
            return loss, {}
        pooled_t_key, pooled_noise_key = jax.random.split(jax.random.fold_in(step_key, POOLED_LOSS_STREAM))
        pooled_t = sample_timesteps(pooled_t_key, batch.pooled.patches.shape[0], snr_type, time_shift)
        pooled_noise = noise_like(pooled_noise_key, batch.pooled.patches)
        pooled_loss = flow_loss(graphdef, params, batch.pooled, pooled_t, pooled_noise, caption, caption_mask, frozen)
        return loss + pooled_loss, {"pooled_loss": pooled_loss}

    # Under the mesh, fused attention kernels split their work by it (`models.attention`).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext():
        (loss, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, step=state.step)
    params = optax.apply_updates(state.params, updates)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def if_finite(new, old):
        # A select rather than lax.cond: it fuses into the update's elementwise kernels.
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = TrainState(
        params=if_finite(params, state.params),
        ema_params=if_finite(ema_update(state.ema_params, params, ema_decay), state.ema_params),
        opt_state=if_finite(opt_state, state.opt_state),
        step=state.step + 1,
        rng=state.rng,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )
    if mesh is not None:
        new_state = jax.lax.with_sharding_constraint(new_state, parameter_shardings(new_state, mesh))
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": opt_state.hyperparams["learning_rate"],  # this step's (ClippedAdamW keeps it there)
        "skipped": ~finite,
        **parts,
    }
    return new_state, metrics

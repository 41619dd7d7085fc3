"""The training step on one device: learning, skipped non-finite steps, EMA, float32 master weights."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from reference import compilations
from sharding_checks import TINY, empty_caption, padded_batch, tiny_model

from lumina_jax.training.checkpoint import to_nested_dict
from lumina_jax.training.objective import sample_timesteps
from lumina_jax.training.step import (
    EMA_DECAY,
    GRAD_CLIP,
    POOLED_LOSS_STREAM,
    WEIGHT_DECAY,
    ClippedAdamW,
    LearningRate,
    TrainBatch,
    _clipped_adamw,
    flow_loss,
    init_train_state,
    noise_like,
    train_step,
)

LR = 1e-3
SIZES = [(4, 6), (8, 8)]  # 6 and 16 tokens: one padded batch
FLOAT32_BOUND = 1e-5

# One optimizer and one batch shape for every test: the step compiles once.
OPTIMIZER = ClippedAdamW(lr=LR)
BATCH = padded_batch(SIZES)
EMPTY, EMPTY_MASK = empty_caption()
evaluate = jax.jit(flow_loss, static_argnums=0)


@pytest.fixture(scope="module")
def bf16_model():
    return tiny_model(jnp.bfloat16)


def fresh_state(model):
    return init_train_state(model, OPTIMIZER, jax.random.PRNGKey(0))


def step(graphdef, state, batch=BATCH, ema_decay=EMA_DECAY):
    # ema_decay always passed, so it is always traced: the step compiles once for all decays
    return train_step(graphdef, state, batch, EMPTY, EMPTY_MASK, optimizer=OPTIMIZER, ema_decay=ema_decay)


def on_host(tree) -> list[np.ndarray]:
    """Host copies: the step donates the state it is given."""
    return [np.array(x) for x in jax.tree.leaves(tree)]


def fixed_draw(batch, seed: int = 0):
    """Times spread over [0, 1] and noise, the same for every evaluation."""
    rng = np.random.default_rng(seed)
    t = jnp.asarray(rng.uniform(0, 1, batch.patches.shape[0]), jnp.float32)
    return t, jnp.asarray(rng.standard_normal(batch.patches.shape, np.float32))


def test_steps_reduce_the_loss_on_a_fixed_batch(bf16_model):
    graphdef, state = fresh_state(bf16_model)
    draws = [fixed_draw(BATCH, seed) for seed in range(4)]

    def loss(params):
        return np.mean(
            [float(evaluate(graphdef, params, BATCH, *draw, BATCH.caption, BATCH.caption_mask)) for draw in draws]
        )

    before = loss(state.params)
    for _ in range(10):
        state, metrics = step(graphdef, state)
        assert not metrics["skipped"] and np.isfinite(metrics["grad_norm"])
    assert float(metrics["lr"]) == pytest.approx(LR)
    assert int(state.step) == 10 and int(state.consecutive_skips) == 0
    assert loss(state.params) < 0.9 * before


def test_a_non_finite_step_changes_nothing_and_is_counted(bf16_model):
    graphdef, state = fresh_state(bf16_model)
    poisoned = BATCH.replace(patches=BATCH.patches.at[1, 3, 0].set(jnp.nan))  # one real token of the second image
    for skips in (1, 2):
        before = on_host((state.params, state.opt_state, state.ema_params))
        state, metrics = step(graphdef, state, poisoned)
        assert bool(metrics["skipped"]) and not np.isfinite(metrics["loss"])
        assert int(state.consecutive_skips) == skips and int(state.step) == skips
        for old, new in zip(before, on_host((state.params, state.opt_state, state.ema_params))):
            np.testing.assert_array_equal(new, old)

    before = on_host(state.params)
    state, metrics = step(graphdef, state)
    assert not metrics["skipped"] and int(state.consecutive_skips) == 0 and int(state.step) == 3
    assert any(not np.array_equal(new, old) for new, old in zip(on_host(state.params), before))


@pytest.mark.parametrize("decay", [0.9, EMA_DECAY])
def test_ema(bf16_model, decay):
    graphdef, state = fresh_state(bf16_model)
    ema_before = on_host(state.ema_params)
    state, _ = step(graphdef, state, ema_decay=decay)
    decay = np.float64(np.float32(decay))  # the step computes in float32
    for ema, old, new in zip(on_host(state.ema_params), ema_before, on_host(state.params)):
        old_term, new_term = decay * old, (1 - decay) * new.astype(np.float64)
        # float32 rounds each product and the sum: an ulp or so of the terms, not of their sum,
        # which cancels where a parameter crosses zero
        rounding = 2 * (
            np.spacing(np.abs(old_term).astype(np.float32)) + np.spacing(np.abs(new_term).astype(np.float32))
        )
        assert np.all(np.abs(ema - (old_term + new_term)) <= rounding)


def test_bf16_compute_keeps_float32_master_weights(bf16_model):
    graphdef, state = fresh_state(bf16_model)
    lowered = train_step.lower(
        graphdef, state, BATCH, EMPTY, EMPTY_MASK, optimizer=OPTIMIZER, ema_decay=EMA_DECAY
    ).as_text()
    assert re.search(r"dot_general.*-> tensor<[0-9x]*xbf16>", lowered), "the matmuls should run in bfloat16"

    norm_scale = np.array(state.params["layers"]["ffn_norm1"]["scale"][...])
    state, _ = step(graphdef, state)
    trees = (state.params, state.ema_params, state.opt_state)
    assert {x.dtype for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)} == {np.dtype("float32")}
    # Norm scales near 1 move by about lr = 1e-3, under half of bfloat16's spacing there (at
    # least 2^-9): bfloat16 weights could not hold these updates.
    updated = np.array(state.params["layers"]["ffn_norm1"]["scale"][...])
    change = np.abs(updated - norm_scale)
    assert 0 < change.max() < 2.0**-8
    assert not np.array_equal(updated.astype(jnp.bfloat16).astype(np.float32), updated)


def test_padded_batch_loss_is_the_mean_of_per_image_losses():
    """Each image weighs the same and sees only its own tokens, as when trained alone."""
    graphdef, params = nnx.split(tiny_model(jnp.float32))
    t, noise = fixed_draw(BATCH)
    padded = float(evaluate(graphdef, params, BATCH, t, noise, BATCH.caption, BATCH.caption_mask))
    alone = []
    for i, (h, w) in enumerate(SIZES):
        image = jax.tree.map(lambda x: x[i : i + 1], BATCH)
        tokens = slice(0, (h // 2) * (w // 2))  # the image's own tokens
        image = TrainBatch(
            image.patches[:, tokens],
            image.positions[:, tokens],
            image.token_mask[:, tokens],
            image.caption,
            image.caption_mask,
        )
        draw = (t[i : i + 1], noise[i : i + 1, tokens])
        alone.append(float(evaluate(graphdef, params, image, *draw, image.caption, image.caption_mask)))
    assert abs(padded / np.mean(alone) - 1) <= FLOAT32_BOUND


def test_the_optimizer_is_torchs_adamw_after_clipping_the_gradient_norm():
    """ClippedAdamW against torch.nn.utils.clip_grad_norm_ then torch.optim.AdamW, as the original trainers
    step: Lumina-Image 2.0's betas and eps, weight decay on, gradients large enough to be clipped."""
    rng = np.random.default_rng(4)
    shapes = {"w": (6, 5), "b": (5,)}
    start = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    grads = [{n: 3 * rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(4)]
    settings = dict(lr=2e-4, weight_decay=0.1, clip=2.0)
    optimizer = ClippedAdamW(**settings, b1=0.9, b2=0.95, eps=1e-15)
    params = {name: jnp.asarray(value) for name, value in start.items()}
    state = optimizer.init(params)
    for grad in grads:
        updates, state = optimizer.update({n: jnp.asarray(g) for n, g in grad.items()}, state, params)
        params = optax.apply_updates(params, updates)

    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in start.items()}
    reference = torch.optim.AdamW(tensors.values(), lr=2e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.1)
    for grad in grads:
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(grad[name])
        assert float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), 2.0)) > 2.0
        reference.step()
    for name, tensor in tensors.items():
        np.testing.assert_allclose(np.asarray(params[name]), tensor.detach().numpy(), rtol=1e-6, atol=1e-7)
        assert not np.allclose(np.asarray(params[name]), start[name], atol=1e-5)  # it moved


def test_learning_rate_warms_up_then_holds_or_follows_a_cosine():
    constant = LearningRate(1e-3, warmup=4)
    cosine = LearningRate(1e-3, warmup=4, cosine_until=14)
    counts = np.arange(16)
    warm = np.minimum(1.0, (counts + 1) / 4)
    progress = np.clip((counts - 4) / 10, 0.0, 1.0)
    np.testing.assert_allclose([float(constant(c)) for c in counts], 1e-3 * warm, rtol=1e-6)
    np.testing.assert_allclose(
        [float(cosine(c)) for c in counts], 1e-3 * warm * (1 + np.cos(np.pi * progress)) / 2, rtol=1e-6, atol=1e-12
    )
    assert float(cosine(14)) == 0.0 and float(constant(100)) == pytest.approx(1e-3)


def test_the_learning_rate_follows_the_runs_step_through_skipped_steps(bf16_model):
    """A skipped (non-finite) step leaves the optimizer state as it was, optax's count included; the schedule
    still moves on with the run's step."""
    schedule = LearningRate(1e-3, warmup=4)
    optimizer = ClippedAdamW(schedule)
    graphdef, state = init_train_state(bf16_model, optimizer, jax.random.PRNGKey(0))
    poisoned = BATCH.replace(patches=BATCH.patches.at[1, 3, 0].set(jnp.nan))
    rates = []
    for batch in (BATCH, poisoned, BATCH, BATCH):
        state, metrics = train_step(graphdef, state, batch, EMPTY, EMPTY_MASK, optimizer=optimizer)
        rates.append(float(metrics["lr"]))
    assert int(state.step) == 4 and int(state.consecutive_skips) == 0
    np.testing.assert_allclose(rates, [float(schedule(step)) for step in range(4)], rtol=1e-6)
    # An optimizer made again with equal settings (a second run in one process) reuses the compiled step.
    with compilations() as compiled:
        train_step(graphdef, state, BATCH, EMPTY, EMPTY_MASK, optimizer=ClippedAdamW(LearningRate(1e-3, warmup=4)))
    assert not compiled


def test_the_optimizer_state_keeps_the_layout_of_runs_saved_with_optax_s_own_count():
    """Checkpoints written while the schedule followed optax's count restore into today's state, and back."""
    params = {"w": jnp.zeros(3)}
    today = ClippedAdamW(LearningRate(1e-3, 4)).init(params)
    before = _clipped_adamw(learning_rate=LearningRate(1e-3, 4), weight_decay=WEIGHT_DECAY, clip=GRAD_CLIP).init(params)

    def layout(state):
        return jax.tree.map(lambda x: (x.shape, x.dtype), to_nested_dict(state))

    assert layout(today) == layout(before)


def test_a_pooled_loss_adds_the_pooled_latents_loss_at_their_own_times_and_noise():
    """`TrainBatch.pooled` (Lumina-Image 2.0's low-resolution loss): the step's loss is the full batch's loss plus
    the pooled latents', each at its own times and noise (the pooled ones from the step key's POOLED_LOSS_STREAM)
    and the same captions, and its gradient is that sum's. The full batch's share is the step without them."""
    model = tiny_model(jnp.float32)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(3)
    latents = [jnp.asarray(rng.standard_normal((4, h, w), np.float32)) for h, w in [(8, 8), (8, 16)]]
    caption = rng.standard_normal((2, 6, TINY.cross_attention_dim), np.float32)
    mask = np.arange(6)[None] < np.array([[6], [3]])
    batch = TrainBatch.from_latents(latents, caption, mask, TINY, pooled_by=2)
    assert batch.pooled.patches.shape[:2] == (2, 8) and batch.pooled.caption is None  # 4x4 and 4x8 latents
    np.testing.assert_allclose(  # the first pooled token: the mean of each channel's top-left 2x2 block
        batch.pooled.patches[0, 0].reshape(4, 4)[:, 0], latents[0][:, :2, :2].mean(axis=(1, 2)), rtol=1e-6
    )

    def run(batch):
        _, state = init_train_state(model, OPTIMIZER, jax.random.PRNGKey(0))
        return train_step(graphdef, state, batch, EMPTY, EMPTY_MASK, optimizer=OPTIMIZER, caption_dropout=0.0)[1]

    with_pooled, without = run(batch), run(dataclasses.replace(batch, pooled=None))
    assert "pooled_loss" not in without

    step_key = jax.random.fold_in(jnp.asarray(jax.random.PRNGKey(0), jnp.uint32), 0)
    t_key, noise_key, _ = jax.random.split(step_key, 3)
    pooled_t_key, pooled_noise_key = jax.random.split(jax.random.fold_in(step_key, POOLED_LOSS_STREAM))
    draws = [
        (batch, sample_timesteps(t_key, 2), noise_like(noise_key, batch.patches)),
        (batch.pooled, sample_timesteps(pooled_t_key, 2), noise_like(pooled_noise_key, batch.pooled.patches)),
    ]

    def total(params):
        full, pooled = (flow_loss(graphdef, params, b, t, noise, caption, mask) for b, t, noise in draws)
        return full + pooled, (full, pooled)

    (_, (full, pooled)), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    assert float(with_pooled["pooled_loss"]) == pytest.approx(float(pooled), rel=1e-6)
    assert float(with_pooled["loss"]) == pytest.approx(float(full + pooled), rel=1e-6)
    assert float(without["loss"]) == pytest.approx(float(full), rel=1e-6)
    assert float(with_pooled["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    assert float(with_pooled["grad_norm"]) != pytest.approx(float(without["grad_norm"]), rel=1e-3)

"""Training compiled for TPU topologies by the real TPU compiler (libtpu), on this machine without a TPU.

Small configurations: they fail when lowering a sharded train step for TPUs breaks, and check the memory
plans, FLOPs and batch searches that `python -m train --compile-only` prints.
"""

import dataclasses
import json

import jax
import pytest
from flax import nnx

pytest.importorskip("libtpu", reason='libtpu (the TPU compiler) is not installed: pip install -e ".[tpu]"')

from tpu_configs import TINY_TRANSFORMER, one_chip, write_config_folder  # noqa: E402

from lumina_jax import tpu  # noqa: E402
from lumina_jax.cli.train import main as train_main  # noqa: E402
from lumina_jax.models.nextdit import NextDiTConfig  # noqa: E402
from lumina_jax.sharding import make_mesh  # noqa: E402
from lumina_jax.training.checkpoint import abstract_train_state  # noqa: E402
from lumina_jax.training.compile_only import (  # noqa: E402
    lower_train_step,
    model_flops,
    plan_samples,
    plan_train_step,
    planned_pooled_latent,
    planned_step,
    run_mesh,
)
from lumina_jax.training.config import TrainConfig, load_config  # noqa: E402
from lumina_jax.training.loop import make_run_optimizer, transformer_factory  # noqa: E402


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """A pipeline folder of config files only, as `--compile-only` takes it."""
    return write_config_folder(tmp_path_factory.mktemp("configs"))


def tiny_train_config(config_folder, **fields) -> TrainConfig:
    """The tiny Next-DiT trained from scratch at 64 px, 8 images a step, on the config-only folder's VAE."""
    return TrainConfig(
        workdir="unused",
        pipeline=str(config_folder),
        data="unused",
        cache="unused",
        init="scratch",
        transformer=NextDiTConfig(**TINY_TRANSFORMER),
        image_size=64,
        batch_size=8,
        **fields,
    )


def test_sharded_train_step_compiles_on_data_fsdp_tensor_mesh(config_folder):
    config = tiny_train_config(config_folder, remat="full", mesh_data=2, mesh_fsdp=2, mesh_tensor=2)
    target = tpu.tpu_slice("v5e-8")
    plan = plan_train_step(config, target)
    (step,) = plan.programs
    assert plan.fits and step.flops > 0 and step.aliased > 0  # the state is donated
    assert plan.resident["train_state"] > 0
    # splash attention per device under shard_map, through Mosaic: the target's platform decides, not this host's
    lowered, _ = lower_train_step(config, run_mesh(config, tpu.compile_devices(target)), 8)
    assert "tpu_custom_call" in lowered.as_text()


def test_offload_remat_keeps_the_saved_layer_inputs_in_host_memory(config_folder):
    """remat="offload": the TPU compiler places the layers' saved inputs in the host's pinned memory, one
    float32 residual stream a layer for each image of the chip, and the plan says so; "full" keeps them on the chip."""
    config = tiny_train_config(config_folder, remat="offload")
    target = tpu.tpu_slice("v5e-8")
    plan = plan_train_step(config, target, count_flops=False)
    (step,) = plan.programs
    assert "offloaded to the host's pinned memory" in plan.summary()
    assert plan.to_json()["programs"][0]["host_transfers"] == step.host_transfers
    height, width = planned_step(config)[1]
    tokens = (height // TINY_TRANSFORMER["patch_size"]) * (width // TINY_TRANSFORMER["patch_size"])
    layer_inputs = TINY_TRANSFORMER["num_layers"] * tokens * TINY_TRANSFORMER["hidden_size"] * 4  # one image a chip
    assert step.host_temporaries >= layer_inputs and step.host_transfers == 2 * step.host_temporaries
    plan = plan_train_step(dataclasses.replace(config, remat="full"), target, count_flops=False)
    assert plan.programs[0].host_temporaries == 0


def test_train_plan_includes_the_samples_drawn_on_the_training_mesh(config_folder, tmp_path):
    """With sample_every, the sampler's programs compile on the training mesh beside the resident training
    state: the text encoder and VAE stay, the EMA's bfloat16 copy (in the state's sharding) visits the sampler."""
    overrides = [
        f"pipeline={config_folder}",
        "init=scratch",
        *(f"transformer.{k}={v}" for k, v in TINY_TRANSFORMER.items()),
        "batch_size=8",
        "image_size=64",
        "mesh_data=2",
        "mesh_fsdp=2",
        "mesh_tensor=2",
        "compute_dtype=bfloat16",
        "sample_steps=2",
        'sample_prompts=["a cat", "a dog"]',
    ]
    config = load_config("digits", [*overrides, "sample_every=10"])
    target = tpu.tpu_slice("v5e-8")
    samples = plan_samples(config, target)
    plan = plan_train_step(config, target, count_flops=False, samples=samples)
    assert [p.name for p in plan.programs] == ["train_step", "text_encoder", "noise", "sampler", "decoder"]
    assert set(plan.resident) == {"train_state", "text_encoder", "vae"} and all(plan.resident.values())
    mesh = run_mesh(config, tpu.compile_devices(target))
    model = nnx.eval_shape(transformer_factory(config))
    state = abstract_train_state(model, make_run_optimizer(config), mesh)
    sampler = next(p for p in plan.programs if p.name == "sampler")
    # The EMA in bfloat16, as the training state shards it: a quarter (fsdp x tensor) of it on each chip.
    assert sampler.weights == tpu.per_chip_bytes(state.ema_params) // 2 < tpu.per_chip_bytes(model) // 2
    assert plan.needs(sampler) == sum(plan.resident.values()) + sampler.weights + sampler.transient
    assert plan.peak_bytes == max(map(plan.needs, plan.programs)) and plan.fits

    def figures(*extra: str) -> dict:
        report = tmp_path / "plan.json"
        arguments = ["--compile-only", "--topology", "v5e-8", "--no-batch-search", "--json", str(report)]
        assert train_main(["--config", "digits", *overrides, *extra, *arguments]) == 0
        return json.loads(report.read_text())

    with_samples, without = figures("sample_every=10"), figures("sample_every=0")
    assert with_samples["samples_fit"] and without["samples_fit"] is None
    assert [p["name"] for p in without["programs"]] == ["train_step"]
    assert with_samples["resident_bytes"]["train_state"] == without["resident_bytes"]["train_state"]
    assert with_samples["peak_bytes"] > without["peak_bytes"]


def test_train_compile_only_cli_says_when_the_batch_does_not_fit(config_folder, tmp_path, capsys):
    """A tiny model at 512 px in pixel-space patches of 2 with 4096 images per chip cannot fit 16 GB."""
    report = tmp_path / "plan.json"
    overrides = [
        f"pipeline={config_folder}",
        "init=scratch",
        "batch_size=4096",
        "image_size=512",
        "sample_every=0",  # the step alone is the point: the digits config's samples would plan three programs more
        *(f"transformer.{k}={v}" for k, v in TINY_TRANSFORMER.items()),
    ]
    code = train_main(
        [
            "--config",
            "digits",
            *overrides,
            "--compile-only",
            "--topology",
            "v5e-1",
            "--no-batch-search",
            "--json",
            str(report),
        ]
    )
    figures = json.loads(report.read_text())
    assert code == 1 and not figures["fits"] and figures["peak_bytes"] > figures["hbm_bytes"]
    assert "does not fit" in capsys.readouterr().out or any(p["refused"] for p in figures["programs"])


def test_train_step_flops_count_every_layer(config_folder):
    """XLA's cost analysis counts a scanned loop's body once; the plan's FLOPs count every layer."""

    def flops(layers: int) -> float:
        transformer = {**TINY_TRANSFORMER, "num_layers": layers}
        overrides = [f"pipeline={config_folder}", "init=scratch", "batch_size=8", "image_size=64"]
        config = load_config("digits", [*overrides, *(f"transformer.{k}={v}" for k, v in transformer.items())])
        return plan_train_step(config, tpu.tpu_slice("v5e-1")).programs[0].flops

    assert flops(4) > 1.8 * flops(2)


def test_a_pooled_loss_is_planned_and_counted(config_folder):
    """pooled_loss_factor: the planned step also takes the pooled latents (square crops: the latent's sides halved),
    and both the model FLOPs and XLA's count of the program's grow by that second pass."""
    plain = tiny_train_config(config_folder, remat="full", max_aspect=1.0)
    pooled = dataclasses.replace(plain, pooled_loss_factor=2)
    cfg, (height, width), caption = planned_step(pooled)
    assert planned_pooled_latent(plain) is None and planned_pooled_latent(pooled) == (height // 2, width // 2)
    second_pass = 3 * pooled.batch_size * cfg.forward_flops(height * width // 16, caption)  # 2x2 patches
    assert model_flops(pooled) == pytest.approx(model_flops(plain) + second_pass, rel=1e-12)
    # XLA's count, as `plan_train_step` takes it: the layers unrolled, on one CPU device
    cpu = make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    lowered = [lower_train_step(config, cpu, 8, unroll_layers=True)[0] for config in (plain, pooled)]
    compiled = [step.cost_analysis()["flops"] for step in lowered]
    assert compiled[1] / compiled[0] == pytest.approx(model_flops(pooled) / model_flops(plain), rel=1e-3)


def test_train_compile_only_plans_a_scratch_config_before_its_pipeline_exists(tmp_path, monkeypatch):
    """The digits config trains in pixel space from a pipeline that its `prepare` writes: no files are needed."""
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "plan.json"
    arguments = ["--compile-only", "--topology", "v5e-1", "--no-batch-search", "--json", str(report)]
    assert train_main(["--config", "digits", *arguments]) == 0
    figures = json.loads(report.read_text())
    assert figures["fits"] and figures["batch_size"] == 64 and not (tmp_path / "out").exists()


def test_train_compile_only_fine_tunes_the_transformer_of_a_config_only_folder(config_folder, tmp_path):
    report = tmp_path / "plan.json"
    overrides = [f"pipeline={config_folder}", "init=pretrained", "batch_size=2", "image_size=64", "sample_every=0"]
    arguments = ["--compile-only", "--topology", "v5e-1", "--no-batch-search", "--json", str(report)]
    assert train_main(["--config", "digits", *overrides, *arguments]) == 0
    config = load_config("digits", [*overrides, *(f"transformer.{k}={v}" for k, v in TINY_TRANSFORMER.items())])
    _, expected = lower_train_step(config, one_chip("v5e-1"), 2)  # the folder's transformer, not the config's
    assert json.loads(report.read_text())["resident_bytes"]["train_state"] == expected

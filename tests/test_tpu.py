"""Compiled for TPU topologies by the real TPU compiler (libtpu), on this machine without a TPU.

Small configurations, a few seconds each: they fail when lowering for TPUs breaks (Mosaic for the
splash attention kernel, the sampler loop, the streamed VAE decoder) and check the memory plans that
`python -m sample --compile-only` prints. The training plans are in test_tpu_training.py.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

pytest.importorskip("libtpu", reason='libtpu (the TPU compiler) is not installed: pip install -e ".[tpu]"')

from tpu_configs import TINY_VAE, one_chip, write_config_folder  # noqa: E402

from lumina_jax import tpu  # noqa: E402
from lumina_jax.cli.sample import main as sample_main  # noqa: E402
from lumina_jax.models import vae as vae_module  # noqa: E402
from lumina_jax.models.attention import dual_attention  # noqa: E402
from lumina_jax.peak_flops import PEAK_BF16_FLOPS  # noqa: E402
from lumina_jax.pipeline import LuminaPipeline  # noqa: E402
from lumina_jax.sharding import make_mesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """A pipeline folder of config files only, as `--compile-only` takes it."""
    return write_config_folder(tmp_path_factory.mktemp("configs"))


@pytest.mark.parametrize(
    "name, topology, chips",
    [
        ("v5e-1", "v5e:1x1", 1),
        ("v5e-8", "v5e:2x4", 8),
        ("v6e-256", "v6e:16x16", 256),
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v4-8", "v4:2x2x1", 4),
        ("v5e:4x4", "v5e:4x4", 16),
    ],
)
def test_slices_as_cloud_tpu_names_them(name, topology, chips):
    target = tpu.tpu_slice(name)
    assert (target.topology, target.chips) == (topology, chips)
    assert len(tpu.compile_devices(target)) == chips  # one device per chip, megacore ones included


@pytest.mark.parametrize("name", ["v5e-3", "v5p-7", "v7-8", "tpu", "v5e:2x2x2"])
def test_unknown_slices_are_refused_with_the_known_ones(name):
    with pytest.raises(ValueError, match="unknown TPU slice .*v5e-8.*v5p-128"):
        tpu.tpu_slice(name)


@pytest.mark.parametrize("generation", sorted(tpu.GENERATIONS))
def test_hbm_table_is_what_the_compiler_allows(generation):
    target = tpu.tpu_slice(f"{generation}-{8 if tpu.GENERATIONS[generation].megacore else 4}")
    mesh = one_chip(target.name)
    assert tpu.compile_devices(target)[0].device_kind == target.generation.device_kind
    huge = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))

    def needs_200_gib(x):  # a barrier keeps the 200 GiB buffer from being fused away
        return jax.lax.optimization_barrier(jnp.broadcast_to(x, (200, 2**28)) + 1).sum()

    refused = tpu.compile_program("huge", jax.jit(needs_200_gib).lower(huge))
    available = re.search(r"available HBM \(([\d.]+)G\)", refused.refused)
    assert available and round(float(available[1]) * tpu.GiB) == pytest.approx(target.hbm_bytes, abs=2**20)


@pytest.mark.parametrize("generation", sorted(tpu.GENERATIONS))
def test_peak_flops_are_known_by_the_device_kind_libtpu_reports(generation):
    kind = tpu.compile_devices(tpu.tpu_slice(f"{generation}-8"))[0].device_kind
    assert kind == tpu.GENERATIONS[generation].device_kind and kind in PEAK_BF16_FLOPS


def test_splash_attention_compiles_through_mosaic_forward_and_backward():
    """The released head layout (GQA 4:1, head_dim 72) with masked caption keys, bfloat16."""
    mesh = one_chip()
    where = NamedSharding(mesh, PartitionSpec())

    def struct(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

    def loss(q, k, v, ck, cv, gate, mask):
        out = dual_attention(q, k, v, ck, cv, scale=72**-0.5, caption_gate=gate, caption_mask=mask, backend="splash")
        return jnp.sum(out**2)

    args = (
        struct(2, 256, 8, 72),
        struct(2, 256, 2, 72),
        struct(2, 256, 2, 72),
        struct(2, 40, 2, 72),
        struct(2, 40, 2, 72),
        struct(8, dtype=jnp.float32),
        struct(2, 40, dtype=jnp.bool_),
    )
    with jax.set_mesh(mesh):
        forward = jax.jit(loss).lower(*args).compile()
        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
    for compiled in (forward, backward):
        assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not a fallback


def test_attention_for_a_given_tpu_mesh_is_splash_without_an_ambient_mesh():
    """The caller says the mesh: its platform picks the kernel (splash, through Mosaic), not this CPU host."""
    mesh = one_chip()
    query = jax.ShapeDtypeStruct((2, 256, 8, 72), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    kv = jax.ShapeDtypeStruct((2, 256, 2, 72), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    lowered = jax.jit(lambda q, k, v: dual_attention(q, k, v, scale=72**-0.5, mesh=mesh)).lower(query, kv, kv)
    assert "tpu_custom_call" in lowered.compile().as_text()


def test_pipeline_programs_compile_and_plan(config_folder):
    pipe = LuminaPipeline.abstract(config_folder, "bfloat16").shard(one_chip())
    programs = pipe.lower(height=128, width=192, num_images_per_prompt=2, num_inference_steps=3, caption_length=20)
    assert list(programs) == ["text_encoder", "noise", "sampler", "decoder"]
    plan = tpu.plan_programs(
        tpu.tpu_slice("v5e-1"),
        programs,
        {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae},
    )
    assert plan.fits and not any(p.refused for p in plan.programs)
    weights = {p.name: p.weights for p in plan.programs}
    assert weights["sampler"] == plan.resident["transformer"] == tpu.per_chip_bytes(nnx.state(pipe.transformer)) > 0
    assert weights["noise"] == 0 and all(p.temporaries >= 0 and p.code > 0 for p in plan.programs)
    assert plan.peak_bytes == sum(plan.resident.values()) + max(p.transient for p in plan.programs)


def test_streamed_vae_decode_compiles():
    """Bands of 16 rows: the decoder's loops, in-place writes and NCHW output, lowered for a TPU."""
    config = vae_module.AutoencoderKLConfig.from_dict(TINY_VAE)
    model = nnx.eval_shape(lambda: vae_module.AutoencoderKL(config, rngs=nnx.Rngs(0)))
    mesh = one_chip()
    graphdef, state = nnx.split(model)
    where = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), state)
    latents = jax.ShapeDtypeStruct((1, 4, 32, 32), jnp.float32, sharding=where)
    lowered = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z, band_pixels=16 * 64)).lower(state, latents)
    assert "while" in lowered.as_text() and lowered.out_info.shape == (1, 3, 64, 64)
    assert not tpu.compile_program("decoder", lowered).refused


def test_offloaded_text_encoder_is_resident_only_while_it_encodes(config_folder):
    pipe = LuminaPipeline.abstract(config_folder, "bfloat16").shard(one_chip()).offload_text_encoder()
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    programs = pipe.lower(height=64, width=64, num_inference_steps=2, caption_length=16)
    plan = tpu.plan_programs(tpu.tpu_slice("v5e-1"), programs, models, offloaded=("text_encoder",))
    encoder = next(p for p in plan.programs if p.name == "text_encoder")
    sampler = next(p for p in plan.programs if p.name == "sampler")
    assert "text_encoder" not in plan.resident and encoder.weights > 0
    assert plan.needs(encoder) == sum(plan.resident.values()) + encoder.weights + encoder.transient
    assert plan.needs(sampler) == sum(plan.resident.values()) + sampler.transient


def test_sample_compile_only_cli(config_folder, tmp_path, capsys):
    report = tmp_path / "plan.json"
    code = sample_main(
        [
            "--compile-only",
            "--topology",
            "v5e-1",
            "--model",
            str(config_folder),
            "--height",
            "64",
            "--width",
            "64",
            "--steps",
            "2",
            "--caption-length",
            "16",
            "--json",
            str(report),
        ]
    )
    assert code == 0
    figures = json.loads(report.read_text())
    assert figures["fits"] and figures["hbm_bytes"] == tpu.GENERATIONS["v5e"].hbm_bytes
    assert 0 < figures["peak_bytes"] < figures["hbm_bytes"]
    assert {p["name"] for p in figures["programs"]} == {"text_encoder", "noise", "sampler", "decoder"}
    assert "fits" in capsys.readouterr().out


def test_without_libtpu_the_error_says_how_to_get_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[tpu\]"'):
        tpu.compile_devices(tpu.tpu_slice("v5e-1"))


def test_per_chip_bytes_counts_each_device_its_shard():
    mesh = make_mesh(fsdp=4, devices=tpu.compile_devices(tpu.tpu_slice("v5e-4")))
    split = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    whole = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    assert tpu.per_chip_bytes([split, whole]) == 2 * 16 * 4 + 8 * 16 * 2
    assert np.isclose(tpu.per_chip_bytes({"a": split}), 128)


def test_sample_compile_only_plans_batch_size_images_a_call_on_every_device(config_folder, tmp_path):
    """On a v5e-4 a run draws --batch-size images on each of the 4 chips per call: that is the program to plan."""

    def plan(batch_size: int) -> dict:
        report = tmp_path / f"plan-{batch_size}.json"
        options = ["--model", str(config_folder), "--height", "64", "--width", "64", "--steps", "1"]
        arguments = ["--compile-only", "--topology", "v5e-4", *options, "--caption-length", "16"]
        assert sample_main([*arguments, "--batch-size", str(batch_size), "--json", str(report)]) == 0
        return json.loads(report.read_text())

    one, two = plan(1), plan(2)
    assert (one["mesh"]["data"], one["images_per_call"], two["images_per_call"]) == (4, 4, 8)
    noise = [next(p for p in figures["programs"] if p["name"] == "noise") for figures in (one, two)]
    assert noise[1]["outputs"] == 2 * noise[0]["outputs"] > 0  # the latents of twice the images


@pytest.mark.parametrize("plan", [False, True], ids=["draw", "compile-only"])
def test_a_command_off_a_tpu_vm_prints_no_libtpu_block(plan, config_folder, tmp_path):
    """libtpu, loaded by JAX to look for TPUs (and by --compile-only to compile), has no metadata server
    here to describe the host and printed an error block, though nothing failed. As a user's shell runs it:
    none of the variables that `import jax` or `lumina_jax` set in this process."""
    unset = ("TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS", "TPU_SKIP_MDS_QUERY", "JAX_PLATFORMS")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # else libtpu, held by another process (a test beside), starts no further
    args = ["--prompt", "a handwritten digit three", "--steps", "1", "--out", str(tmp_path)]
    if plan:
        args += ["--compile-only", "--topology", "v5e-1", "--model", str(config_folder), "--height", "64"]
        args += ["--width", "64", "--caption-length", "16"]
    run = subprocess.run(
        [sys.executable, "-m", "sample", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    assert "TPU" not in run.stderr, run.stderr

"""AutoencoderKL against diffusers, every parameter randomised, through the real import path; key map,
config, conversion and error messages."""

import inspect
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from flax import nnx
from reference import ShapeOnly, randomize_, relative_error, released

from lumina_jax.models import vae
from lumina_jax.models.vae import FLUX_VAE, SDXL_VAE, AutoencoderKL, AutoencoderKLConfig, SpatialSelfAttention, Upsample
from lumina_jax.weights import importer
from lumina_jax.weights.importer import CONV, LINEAR, Target, UnknownKeyError
from lumina_jax.weights.safetensors_io import read_safetensors, write_safetensors
from lumina_jax.weights.vae import (
    convert_vae,
    find_vae,
    import_params,
    load_vae,
    parameter_shapes,
    vae_key_to_target,
)

CONFIGS = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8),
    "released_widths": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=1),
    # the FLUX VAE's kind (Lumina-Image 2.0's): 16 latent channels, no quant convs; odd widths
    "flux": dict(
        block_out_channels=[24, 40, 40],
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
}
IMAGE_SIZE = (32, 48)
FLOAT32_BOUND = 1e-5
# bfloat16 compute and weights against the float32 reference; measured 0.95e-2 to 1.7e-2 (worst channel of the
# mean, logvar and decoded image, both configs), float32 1.1e-6 to 5.8e-6 (diffusers' own float32 is 4.9e-6 off float64)
BFLOAT16_BOUND = 3e-2
SDXL_CONFIG_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.18.0.dev0",
    "_name_or_path": "stabilityai/sdxl-vae",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
}


def diffusers_vae(seed: int, block_out_channels: list[int], **config) -> DiffusersAutoencoderKL:
    """A randomised diffusers VAE whose posterior has two log-variance channels far past the clamp
    (one above, one below), so the clamp is compared too (moved by the last conv before the split: quant_conv,
    or the encoder's conv_out where there is none)."""
    blocks = len(block_out_channels)
    model = DiffusersAutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        **config,
    )
    model = randomize_(model.eval(), seed)
    with torch.no_grad():
        latent = model.config.latent_channels
        moments = model.quant_conv if model.quant_conv is not None else model.encoder.conv_out
        moments.bias[latent : latent + 2] += torch.tensor([60.0, -60.0])
    return model


def per_channel_error(ours, reference) -> float:
    """The worst channel's relative error: clamped channels are constants, and large values in one
    channel must not hide errors in another."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    return max(relative_error(ours[:, c], reference[:, c]) for c in range(reference.shape[1]))


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved_vae(request, tmp_path_factory):
    """(folder, images, latents, diffusers' (mean, logvar, decoded)); the released widths are saved sharded."""
    name = request.param
    reference = diffusers_vae(len(name), **CONFIGS[name])
    folder = tmp_path_factory.mktemp(name)
    reference.save_pretrained(folder, max_shard_size="60MB" if name == "released_widths" else "10GB")
    rng = np.random.default_rng(3)
    factor = 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
    images = rng.uniform(-1, 1, (2, 3, *IMAGE_SIZE)).astype(np.float32)
    channels = reference.config.latent_channels
    latents = rng.standard_normal((2, channels, IMAGE_SIZE[0] // factor, IMAGE_SIZE[1] // factor)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(images)).latent_dist
        decoded = reference.decode(torch.from_numpy(latents)).sample
    expected = tuple(t.numpy() for t in (posterior.mean, posterior.logvar, decoded))
    return folder, images, latents, expected


# Jitted as a pipeline runs them; defined once, so loads of one config share their compilations.
encode = nnx.jit(lambda model, images: model.encode(images))
decode = nnx.jit(lambda model, latents: model.decode(latents))


def errors(model, saved) -> dict[str, float]:
    _, images, latents, expected = saved
    ours = (*encode(model, jnp.asarray(images)), decode(model, jnp.asarray(latents)))
    return {name: per_channel_error(o, e) for name, o, e in zip(("mean", "logvar", "decoded"), ours, expected)}


def test_float32_matches_diffusers(saved_vae):
    measured = errors(load_vae(saved_vae[0], progress=False), saved_vae)
    assert max(measured.values()) <= FLOAT32_BOUND, measured


def test_bfloat16_within_tier(saved_vae):
    model = load_vae(saved_vae[0], dtype="bfloat16", progress=False)
    assert model.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
    measured = errors(model, saved_vae)
    assert max(measured.values()) <= BFLOAT16_BOUND, measured


@pytest.mark.parametrize("dtype, bound", [("float32", FLOAT32_BOUND), ("bfloat16", BFLOAT16_BOUND)])
def test_streamed_decoder_matches_diffusers(saved_vae, dtype, bound):
    """Bands of a few rows at every resolution: resnets (in place over x or over h), upsamples and the
    NCHW tail all stream, against diffusers' whole-image decode."""
    folder, _, latents, expected = saved_vae
    model = load_vae(folder, dtype=dtype, progress=False)
    decoded = nnx.jit(lambda model, latents: model.decode(latents, band_pixels=100))(model, jnp.asarray(latents))
    assert per_channel_error(decoded, expected[2]) <= bound


@pytest.mark.parametrize("latent_size", [(7, 5), (12, 10), (3, 16)])
def test_streamed_decoder_equals_whole_decode_at_odd_sizes(latent_size):
    config = AutoencoderKLConfig(
        block_out_channels=(32, 64, 64),
        down_block_types=(vae.DOWN_BLOCK,) * 3,
        up_block_types=(vae.UP_BLOCK,) * 3,
        norm_num_groups=8,
    )
    model = AutoencoderKL(config, rngs=nnx.Rngs(0))
    randomize_nnx_(model, seed=1)
    latents = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, *latent_size), dtype=np.float32))
    whole = np.asarray(nnx.jit(lambda model, z: model.decode(z))(model, latents))
    streamed_decode = nnx.jit(lambda model, z, band_pixels: model.decode(z, band_pixels=band_pixels), static_argnums=2)
    for band_pixels in (20, 64, 300):
        streamed = np.asarray(streamed_decode(model, latents, band_pixels))
        assert relative_error(streamed, whole) <= FLOAT32_BOUND, band_pixels


def randomize_nnx_(model: nnx.Module, seed: int) -> None:
    """Every parameter random (norm scales around 1), in place."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(
        model,
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * 0.2 + (p.ndim == 1)), state),
    )


@pytest.mark.parametrize(
    "height, width, rows",
    [(16, 16, 16), (2048, 2048, 32), (1024, 1024, 64), (12, 2**14, 4), (13, 2**14, 1), (8, 2**17, 1)],
)
def test_band_rows_divide_the_height_within_the_band_size(height, width, rows):
    assert vae.band_rows(height, width, vae.DECODE_BAND_PIXELS) == rows


def test_attention_in_query_chunks_is_exact():
    attention = SpatialSelfAttention(16, 4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 16), dtype=np.float32))
    attend = nnx.jit(lambda module, x, query_chunk: module(x, query_chunk), static_argnums=2)
    whole = np.asarray(attend(attention, x, vae.ATTENTION_QUERY_CHUNK))
    chunked = np.asarray(attend(attention, x, 6))  # 35 queries: 6 chunks of 6, the last padded
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6 * np.abs(whole).max())


@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (1, 1, 3, 16), (1, 6, 6, 32)])
def test_upsample_without_the_upsampled_image_is_exact(shape):
    upsample = Upsample(shape[-1], dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    upsample.conv.bias[...] = jnp.linspace(-1.0, 1.0, shape[-1])
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    ours = nnx.jit(lambda module, x: module(x))(upsample, x)
    upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    expected = nnx.jit(lambda conv, x: conv(x))(upsample.conv, upsampled)  # the 3x3 conv on the x2 image
    assert ours.shape == expected.shape == (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=0, atol=1e-6 * np.abs(expected).max())


def test_key_examples():
    assert vae_key_to_target("encoder.down_blocks.1.resnets.0.conv_shortcut.weight") == Target(
        ("encoder", "down_blocks", 1, "resnets", 0, "conv_shortcut", "kernel"), permute=CONV
    )
    assert vae_key_to_target("decoder.up_blocks.2.upsamplers.0.conv.bias") == Target(
        ("decoder", "up_blocks", 2, "upsample", "conv", "bias")
    )
    assert vae_key_to_target("encoder.down_blocks.0.downsamplers.0.conv.weight").path[3] == "downsample"
    assert vae_key_to_target("decoder.mid_block.attentions.0.to_out.0.weight") == Target(
        ("decoder", "mid_block", "attention", "to_out", "kernel"), permute=LINEAR
    )
    assert vae_key_to_target("encoder.mid_block.attentions.0.group_norm.weight") == Target(
        ("encoder", "mid_block", "attention", "group_norm", "scale")
    )
    assert vae_key_to_target("decoder.conv_norm_out.bias") == Target(("decoder", "conv_norm_out", "bias"))
    assert vae_key_to_target("quant_conv.weight") == Target(("quant_conv", "kernel"), permute=CONV)
    # names from before diffusers' attention refactor, which diffusers still loads
    for old, new in [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")]:
        for kind in ("weight", "bias"):
            prefix = "encoder.mid_block.attentions.0"
            assert vae_key_to_target(f"{prefix}.{old}.{kind}") == vae_key_to_target(f"{prefix}.{new}.{kind}")


@pytest.mark.parametrize(
    "key",
    [
        "encoder.up_blocks.0.resnets.0.conv1.weight",
        "decoder.down_blocks.0.resnets.0.conv1.weight",
        "encoder.mid_block.attentions.1.to_q.weight",
        "decoder.up_blocks.0.upsamplers.1.conv.weight",
        "encoder.conv_in.weight_g",
        "vae.encoder.conv_in.weight",
        "quant_conv.key.weight",
    ],
)
def test_unknown_keys_raise(key):
    with pytest.raises(UnknownKeyError):
        vae_key_to_target(key)


def test_released_keys_cover_every_parameter_of_the_sdxl_vae():
    tensors = released("keys_diffusers_sdxl_vae.json")
    plan = importer.plan_import(
        tensors, vae_key_to_target, parameter_shapes(SDXL_VAE), Path("sdxl-vae"), "AutoencoderKL"
    )
    assert len(plan) == len(tensors) == 248


def flux_keys() -> dict[str, ShapeOnly]:
    """The FLUX VAE's keys: the SDXL VAE's without the quant convs, 16 latent channels at both ends."""
    tensors = released("keys_diffusers_sdxl_vae.json")
    for conv in ("quant_conv", "post_quant_conv"):
        del tensors[f"{conv}.weight"], tensors[f"{conv}.bias"]
    tensors["encoder.conv_out.weight"] = ShapeOnly((32, 512, 3, 3))
    tensors["encoder.conv_out.bias"] = ShapeOnly((32,))
    tensors["decoder.conv_in.weight"] = ShapeOnly((512, 16, 3, 3))
    return tensors


def test_flux_vae_keys_cover_every_parameter_and_quant_convs_are_refused():
    tensors = flux_keys()
    plan = importer.plan_import(
        tensors, vae_key_to_target, parameter_shapes(FLUX_VAE), Path("flux-vae"), "AutoencoderKL"
    )
    assert len(plan) == len(tensors) == 244
    tensors["quant_conv.weight"] = ShapeOnly((32, 32, 1, 1))
    with pytest.raises(ValueError, match=r"(?s)flux-vae.*unknown keys \(1\): quant_conv.weight"):
        importer.plan_import(tensors, vae_key_to_target, parameter_shapes(FLUX_VAE), Path("flux-vae"), "AutoencoderKL")


def test_every_problem_is_listed_at_once():
    tensors = released("keys_diffusers_sdxl_vae.json")
    del tensors["decoder.mid_block.attentions.0.to_k.bias"]
    tensors["encoder.conv_in.weight"] = ShapeOnly((128, 4, 3, 3))
    tensors["encoder.down_blocks.3.downsamplers.0.conv.weight"] = ShapeOnly((512, 512, 3, 3))
    with pytest.raises(ValueError) as error:
        importer.plan_import(
            tensors, vae_key_to_target, parameter_shapes(SDXL_VAE), Path("/models/vae"), "AutoencoderKL"
        )
    message = str(error.value)
    assert "/models/vae" in message
    assert "unknown keys (1): encoder.down_blocks.3.downsamplers.0.conv.weight" in message
    assert "missing parameters (1): decoder.mid_block.attention.to_k.bias" in message
    assert "encoder.conv_in.weight (128, 4, 3, 3) (expected (128, 3, 3, 3))" in message


def test_config():
    assert AutoencoderKLConfig.from_dict(SDXL_CONFIG_JSON) == SDXL_VAE
    assert SDXL_VAE.downsample_factor == 8
    assert AutoencoderKLConfig.from_dict(SDXL_VAE.to_dict()) == SDXL_VAE
    diffusers_defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(DiffusersAutoencoderKL.__init__).parameters.items()
        if name != "self"
    }
    assert AutoencoderKLConfig.from_dict(diffusers_defaults) == AutoencoderKLConfig()
    with pytest.raises(ValueError, match=r"unknown AutoencoderKL config fields \['num_layers'\]"):
        AutoencoderKLConfig.from_dict({**SDXL_CONFIG_JSON, "num_layers": 2})
    with pytest.raises(ValueError, match="only DownEncoderBlock2D is supported"):
        AutoencoderKLConfig.from_dict({**SDXL_CONFIG_JSON, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    flux_config_json = {  # black-forest-labs/FLUX.1-dev's vae/config.json
        **SDXL_CONFIG_JSON,
        "_diffusers_version": "0.30.0.dev0",
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "mid_block_add_attention": True,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }
    del flux_config_json["_name_or_path"]
    assert AutoencoderKLConfig.from_dict(flux_config_json) == FLUX_VAE
    with pytest.raises(ValueError, match="act_fn 'gelu'"):
        AutoencoderKLConfig(act_fn="gelu")
    with pytest.raises(ValueError, match="not all divisible by norm_num_groups 32"):
        AutoencoderKLConfig(block_out_channels=(48,))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vae")
    diffusers_vae(11, **CONFIGS["tiny"]).save_pretrained(folder)
    return folder


def assert_same_arrays(ours: dict, expected: dict):
    assert ours.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(ours[path]), value, err_msg=str(path))


def test_pipeline_folder_convert_and_load_round_trip(tiny_folder, tmp_path):
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "LuminaText2ImgPipeline"}))
    for file in tiny_folder.iterdir():
        (pipeline / "vae" / file.name).symlink_to(file)
    assert convert_vae(pipeline, tmp_path / "converted", progress=False) == tmp_path / "converted"
    converted = load_vae(tmp_path / "converted", progress=False)
    assert converted.config == AutoencoderKLConfig.from_dict(json.loads((tiny_folder / "config.json").read_text()))
    assert_same_arrays(
        importer.flatten(nnx.to_pure_dict(nnx.state(converted, nnx.Param))),
        import_params(find_vae(tiny_folder), progress=False),
    )
    with pytest.raises(ValueError, match="already in our format"):
        convert_vae(tmp_path / "converted", tmp_path / "again", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        convert_vae(tiny_folder, tmp_path / "converted", progress=False)


def test_checkpoints_with_the_deprecated_attention_names_load(tiny_folder, tmp_path):
    renamed = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, tensor in read_safetensors(tiny_folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in renamed.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        tensors[key] = tensor.load()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", tensors)
    assert_same_arrays(
        import_params(find_vae(tmp_path), progress=False), import_params(find_vae(tiny_folder), progress=False)
    )


def test_folder_errors_name_the_folder_and_what_is_missing(tiny_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no AutoencoderKL weights found \(no config.json\)"):
        load_vae(tmp_path / "empty")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="pipeline: a diffusers pipeline folder without vae/"):
        load_vae(tmp_path / "pipeline")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((tiny_folder / "config.json").read_text())
    with pytest.raises(ValueError, match="no_weights: config.json but no diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path / "no_weights")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "LuminaNextDiT2DModel", "hidden_size": 2304})
    )
    with pytest.raises(
        ValueError, match=r"transformer/config.json: not a supported AutoencoderKL config: .*'hidden_size'"
    ):
        load_vae(tmp_path / "transformer")


def test_unknown_key_in_a_checkpoint_is_named(tiny_folder, tmp_path):
    tensors = {k: t.load() for k, t in read_safetensors(tiny_folder / "diffusion_pytorch_model.safetensors").items()}
    tensors["encoder.mid_block.attentions.0.to_q.lora_A.weight"] = np.zeros((4, 64), np.float32)
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"unknown keys \(1\): encoder.mid_block.attentions.0.to_q.lora_A.weight"):
        load_vae(tmp_path, progress=False)


def test_input_errors():
    tiny = dict(
        block_out_channels=(8, 8),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    # abstract models (no weights): every check happens before any computation
    model = nnx.eval_shape(lambda: AutoencoderKL(AutoencoderKLConfig(**tiny), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"image size 31x48 is not divisible by 2"):
        model.encode(jnp.zeros((1, 3, 31, 48)))
    with pytest.raises(ValueError, match=r"images must be \[batch, 3, height, width\], got \(1, 4, 16, 16\)"):
        model.encode(jnp.zeros((1, 4, 16, 16)))
    with pytest.raises(ValueError, match=r"images must be \[batch, 3, height, width\], got \(3, 16, 16\)"):
        model.encode(jnp.zeros((3, 16, 16)))
    with pytest.raises(ValueError, match=r"latents must be \[batch, 4, height, width\], got \(1, 3, 8, 8\)"):
        model.decode(jnp.zeros((1, 3, 8, 8)))
    four_blocks = {k: v * 2 if isinstance(v, tuple) else v for k, v in tiny.items()}
    model = nnx.eval_shape(lambda: AutoencoderKL(AutoencoderKLConfig(**four_blocks), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"image size 1024x1020 is not divisible by 8"):
        model.encode(jnp.zeros((1, 3, 1024, 1020)))


def test_latents_are_scaled_and_shifted_as_diffusers_pipelines_do():
    """diffusers: latents = (z - shift_factor) * scaling_factor before the transformer, and back before decoding
    (FLUX's VAE has a shift; the SDXL VAE none)."""
    z = np.linspace(-3.0, 3.0, 12, dtype=np.float32).reshape(1, 3, 2, 2)
    for config in (SDXL_VAE, FLUX_VAE):
        shift = config.shift_factor or 0.0
        np.testing.assert_allclose(config.scale_latents(z), (z - shift) * config.scaling_factor, rtol=1e-6)
        np.testing.assert_allclose(config.unscale_latents(config.scale_latents(z)), z, rtol=1e-5, atol=1e-6)

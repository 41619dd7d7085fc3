"""The Gemma text encoder against transformers' GemmaModel (hidden_states[-2], as Lumina's pipeline takes
it), every parameter randomised, through the real import path; key coverage of the released gemma-2b;
layouts, conversion and the errors users see."""

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from reference import ShapeOnly, randomize_, relative_error, released
from safetensors.numpy import load_file, save_file
from transformers.initialization import no_init_weights

from lumina_jax.models.gemma import GEMMA_2B, GemmaConfig
from lumina_jax.weights import orbax_io
from lumina_jax.weights.gemma import (
    convert_text_encoder,
    find_text_encoder,
    gemma_key_to_target,
    parameter_shapes,
    transformers_state_dict,
)
from lumina_jax.weights.importer import LINEAR, Target, UnknownKeyError, plan_import
from lumina_jax.weights.text_encoder import load_text_encoder

CONFIGS = {
    # head_dim * heads (96) differs from hidden_size (64), as in gemma-7b; biases on, to cover attention_bias
    "tiny": dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        attention_bias=True,
    ),
    "released_widths": dict(
        vocab_size=1000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
    ),
}
# padded length (a multiple of 8, as the pipeline's tokenizer pads) and valid tokens per row
CASES = {"length8": (8, [8, 3]), "length16": (16, [16, 5, 11])}
FLOAT32_BOUND = 1e-5
# bfloat16 weights and compute against the float32 reference: measured 1.0e-2 to 2.0e-2 on these cases, where
# transformers' own bfloat16 forward is 1.5e-2 to 2.6e-2 from its float32; the tier of the format, not of the port.
BFLOAT16_BOUND = 3e-2


def random_gemma(seed: int, **config) -> transformers.GemmaModel:
    """A GemmaModel with every parameter random; its norm weights (offsets from 1, zero at init) included."""
    with no_init_weights():  # every parameter is overwritten below: skip the init of 10^8 weights
        model = transformers.GemmaModel(transformers.GemmaConfig(**config))
    return randomize_(model.eval(), seed)


def token_inputs(seed: int, vocab_size: int, length: int, valid: list[int]):
    """Right-padded input_ids (pad id 0, as the tokenizer writes) and their attention_mask."""
    mask = (np.arange(length)[None] < np.asarray(valid)[:, None]).astype(np.int64)
    ids = np.random.default_rng(seed).integers(1, vocab_size, mask.shape)
    return np.where(mask == 1, ids, 0), mask


def reference_features(model: transformers.GemmaModel, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    return out.hidden_states[-2].numpy()


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def encode(encoder, ids, mask) -> np.ndarray:
    """Compiled, so encoders of one config and dtype share one program per length. jax.jit over the split
    state rather than nnx.jit, which copies every parameter on each call (about a second at released widths)."""
    return np.asarray(_encode(*nnx.split(encoder), jnp.asarray(ids), jnp.asarray(mask)))


@pytest.fixture(scope="module", params=list(CONFIGS))
def parity(request, tmp_path_factory):
    """A saved reference, its expected features per case, and our encoder loaded from it in both dtypes."""
    config = CONFIGS[request.param]
    reference = random_gemma(len(request.param), **config)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    cases = {}
    for seed, (case, (length, valid)) in enumerate(CASES.items()):
        ids, mask = token_inputs(seed, config["vocab_size"], length, valid)
        cases[case] = ids, mask, reference_features(reference, ids, mask)
    del reference
    encoders = {dtype: load_text_encoder(folder, dtype, progress=False) for dtype in ("float32", "bfloat16")}
    return cases, encoders


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_transformers_at_every_position(parity, case):
    cases, encoders = parity
    ids, mask, expected = cases[case]
    ours = encode(encoders["float32"], ids, mask)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    assert relative_error(ours, expected) <= FLOAT32_BOUND


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_within_tier(parity, case):
    cases, encoders = parity
    ids, mask, expected = cases[case]
    assert encoders["bfloat16"].embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert relative_error(encode(encoders["bfloat16"], ids, mask), expected) <= BFLOAT16_BOUND


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny reference saved as one safetensors file, and our float32 encoder of it."""
    reference = random_gemma(7, **CONFIGS["tiny"])
    folder = tmp_path_factory.mktemp("tiny_single")
    reference.save_pretrained(folder)
    return reference, folder, load_text_encoder(folder, progress=False)


TINY_IDS, TINY_MASK = token_inputs(3, CONFIGS["tiny"]["vocab_size"], 8, [8, 2])


def test_rows_without_any_token_to_attend_match_transformers(tiny):
    """An all-padding row and a left-padded row leave queries with no key: transformers' SDPA gives them zeros."""
    reference, _, encoder = tiny
    mask = np.array([[0] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    expected = reference_features(reference, TINY_IDS, mask)
    assert relative_error(encode(encoder, TINY_IDS, mask), expected) <= FLOAT32_BOUND


def test_unrolled_layers_match_scan(tiny):
    _, folder, scanned = tiny
    unrolled = load_text_encoder(folder, scan_layers=False, progress=False)
    expected = encode(scanned, TINY_IDS, TINY_MASK)
    np.testing.assert_allclose(
        encode(unrolled, TINY_IDS, TINY_MASK), expected, rtol=0, atol=1e-6 * float(np.abs(expected).max())
    )


def test_convert_then_load_loses_nothing(tiny, tmp_path):
    reference, folder, encoder = tiny
    out = convert_text_encoder(folder, tmp_path / "converted", progress=False)
    assert orbax_io.is_converted(out)
    converted = load_text_encoder(out, progress=False)
    assert converted.config == encoder.config
    np.testing.assert_array_equal(encode(converted, TINY_IDS, TINY_MASK), encode(encoder, TINY_IDS, TINY_MASK))
    # the last layer and the final norm, which never run, come back too
    exported = transformers_state_dict(converted)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert exported.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    with pytest.raises(ValueError, match="already in our format"):
        convert_text_encoder(out, tmp_path / "again", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        convert_text_encoder(folder, out, progress=False)


def test_bfloat16_conversion_stores_bfloat16(tiny, tmp_path):
    _, folder, encoder = tiny
    out = convert_text_encoder(folder, tmp_path / "bf16", dtype="bfloat16", progress=False)
    as_float32 = load_text_encoder(out, progress=False)  # bfloat16 on disk, read as float32: exactly those values
    np.testing.assert_array_equal(
        np.asarray(as_float32.layers.mlp.up_proj.kernel[...]),
        np.asarray(encoder.layers.mlp.up_proj.kernel[...]).astype(jnp.bfloat16).astype(np.float32),
    )


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tiny, tmp_path):
    reference, _, encoder = tiny
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    sharded = load_text_encoder(tmp_path, progress=False)
    np.testing.assert_array_equal(encode(sharded, TINY_IDS, TINY_MASK), encode(encoder, TINY_IDS, TINY_MASK))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {shards[-1].name}, which is missing"):
        load_text_encoder(tmp_path, progress=False)


def test_pipeline_folder_and_causal_lm_keys_load(tiny, tmp_path):
    _, folder, encoder = tiny
    expected = encode(encoder, TINY_IDS, TINY_MASK)
    shutil.copytree(folder, tmp_path / "pipeline" / "text_encoder")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    np.testing.assert_array_equal(
        encode(load_text_encoder(tmp_path / "pipeline", progress=False), TINY_IDS, TINY_MASK), expected
    )

    causal_lm = tmp_path / "causal_lm"  # GemmaForCausalLM's layout: everything under model., lm_head tied
    causal_lm.mkdir()
    shutil.copy(folder / "config.json", causal_lm)
    save_file(
        {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}, causal_lm / "model.safetensors"
    )
    np.testing.assert_array_equal(encode(load_text_encoder(causal_lm, progress=False), TINY_IDS, TINY_MASK), expected)


def test_examples_of_the_key_map():
    assert gemma_key_to_target("layers.4.self_attn.k_proj.weight") == Target(
        ("layers", "self_attn", "k_proj", "kernel"), 4, LINEAR
    )
    assert gemma_key_to_target("model.layers.4.self_attn.k_proj.weight") == gemma_key_to_target(
        "layers.4.self_attn.k_proj.weight"
    )
    assert gemma_key_to_target("layers.0.self_attn.o_proj.bias") == Target(("layers", "self_attn", "o_proj", "bias"), 0)
    assert gemma_key_to_target("layers.17.post_attention_layernorm.weight") == Target(
        ("layers", "post_attention_layernorm", "weight"), 17
    )
    assert gemma_key_to_target("embed_tokens.weight") == Target(("embed_tokens", "embedding"))
    assert gemma_key_to_target("model.norm.weight") == Target(("norm", "weight"))


@pytest.mark.parametrize(
    "key", ["lm_head.weight", "layers.0.mlp.gate_proj.bias", "layers.x.input_layernorm.weight", "model.rotary_emb"]
)
def test_unknown_keys_raise(key):
    with pytest.raises(UnknownKeyError):
        gemma_key_to_target(key)


def test_released_gemma_2b_keys_plan_cleanly():
    source = Path("gemma-2b/model.safetensors")
    tensors = released("keys_transformers_gemma_2b.json")
    shapes = parameter_shapes(GEMMA_2B)
    assert len(plan_import(tensors, gemma_key_to_target, shapes, source, "Gemma")) == len(tensors) == 164
    prefixed = {f"model.{k}": v for k, v in tensors.items()}
    assert len(plan_import(prefixed, gemma_key_to_target, shapes, source, "Gemma")) == 164
    del tensors["layers.17.mlp.down_proj.weight"]
    tensors["lm_head.weight"] = ShapeOnly((256000, 2048))
    tensors["layers.3.self_attn.k_proj.weight"] = ShapeOnly((2048, 2048))  # multi-head keys: not gemma-2b
    with pytest.raises(ValueError) as error:
        plan_import(tensors, gemma_key_to_target, shapes, source, "Gemma")
    message = str(error.value)
    assert "unknown keys (1): lm_head.weight" in message
    assert "missing parameters (1): layers.mlp.down_proj.kernel (layer 17)" in message
    assert "layers.3.self_attn.k_proj.weight (2048, 2048) (expected (256, 2048))" in message


def test_config_reads_transformers_files(tmp_path):
    # gemma-2b as transformers 4.x writes it: legacy "gelu" (read as the tanh GELU), rope_theta, rope_scaling null
    gemma_2b_v4 = dict(
        architectures=["GemmaForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=2,
        eos_token_id=1,
        head_dim=256,
        hidden_act="gelu",
        hidden_activation=None,
        hidden_size=2048,
        initializer_range=0.02,
        intermediate_size=16384,
        max_position_embeddings=8192,
        model_type="gemma",
        num_attention_heads=8,
        num_hidden_layers=18,
        num_key_value_heads=1,
        pad_token_id=0,
        rms_norm_eps=1e-6,
        rope_scaling=None,
        rope_theta=10000.0,
        torch_dtype="bfloat16",
        transformers_version="4.38.0",
        use_cache=True,
        vocab_size=256000,
    )
    config = GemmaConfig.from_dict(gemma_2b_v4)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (18, 2048, 1)
    assert GemmaConfig.from_dict(GEMMA_2B.to_dict()) == GEMMA_2B
    # transformers 5 writes rope_parameters instead of rope_theta
    transformers.GemmaConfig(**CONFIGS["tiny"], rope_theta=500.0).save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in v5 and GemmaConfig.from_dict(v5).rope_theta == 500.0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gemma2"), "model_type 'gemma2' is not supported"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_parameters"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(hidden_activation="gelu"), "tanh-approximated GELU"),
        (dict(query_pre_attn_scalar=224), "unknown Gemma config fields \\['query_pre_attn_scalar'\\]"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    ],
)
def test_config_refuses_what_it_does_not_compute(change, message):
    with pytest.raises(ValueError, match=message):
        GemmaConfig.from_dict({**GEMMA_2B.to_dict(), **change})


def test_folder_errors_name_the_folder_and_what_is_missing(tiny, tmp_path):
    _, folder, _ = tiny
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_text_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no Gemma weights found"):
        load_text_encoder(tmp_path / "empty")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="pipeline: a diffusers pipeline folder without text_encoder/"):
        load_text_encoder(tmp_path / "pipeline")
    (tmp_path / "config_only").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "config_only")
    with pytest.raises(ValueError, match="config_only: config.json but no model.safetensors"):
        load_text_encoder(tmp_path / "config_only")
    (tmp_path / "next_dit").mkdir()
    (tmp_path / "next_dit" / "config.json").write_text(json.dumps({"_class_name": "LuminaNextDiT2DModel"}))
    save_file({}, tmp_path / "next_dit" / "model.safetensors")
    with pytest.raises(ValueError, match="next_dit/config.json: not a supported Gemma config"):
        find_text_encoder(tmp_path / "next_dit")


def test_unknown_and_missing_tensors_are_listed(tiny, tmp_path):
    _, folder, _ = tiny
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    del tensors["norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_text_encoder(tmp_path, progress=False)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "unknown keys (1): lm_head.weight" in message and "missing parameters (1): norm.weight" in message


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (np.zeros((2, 8), np.int32), np.ones((3, 8)), "attention_mask has batch size 3, input_ids has 2"),
        (np.zeros((2, 8), np.int32), np.ones((2, 16)), r"attention_mask shape \(2, 16\) does not match"),
        (np.zeros((2, 8), np.float32), np.ones((2, 8)), "input_ids must be integers"),
        (np.zeros((8,), np.int32), np.ones((8,)), r"input_ids must be integers \[batch, length\]"),
    ],
)
def test_input_errors(tiny, ids, mask, message):
    with pytest.raises(ValueError, match=message):
        tiny[2](jnp.asarray(ids), jnp.asarray(mask))

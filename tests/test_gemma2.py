"""The Gemma-2 text encoder of Lumina-Image 2.0 against transformers' Gemma2Model (hidden_states[-2], as
diffusers' Lumina2Pipeline and the original take it), every parameter randomised, through the real import
path: sliding windows shorter than the captions, soft-capped logits, right-padded batches as both references
tokenize them; the layouts and the errors users see."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference import build_tokenizer, randomize_, relative_error
from safetensors.numpy import load_file, save_file
from test_gemma import encode, token_inputs
from transformers.initialization import no_init_weights

from lumina_jax.models.gemma2 import GEMMA_2_2B, PROMPT_START, SYSTEM_PROMPTS, Gemma2Config, Gemma2Encoder
from lumina_jax.weights import orbax_io
from lumina_jax.weights.gemma2 import GEMMA2, convert_gemma2, gemma2_key_to_target, transformers_state_dict
from lumina_jax.weights.importer import Target, UnknownKeyError
from lumina_jax.weights.text_encoder import load_text_encoder, text_encoder_model

CONFIGS = {
    # odd widths; heads * head_dim (72) differs from hidden_size (60); query_pre_attn_scalar is not head_dim;
    # a cap of 3 keeps tanh far from linear; a window of 3 tokens, much shorter than the captions
    "odd": dict(
        vocab_size=97,
        hidden_size=60,
        intermediate_size=90,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=18,
        query_pre_attn_scalar=40,
        sliding_window=3,
        attn_logit_softcapping=3.0,
        attention_bias=True,
        rope_theta=500.0,
    ),
    # six query heads over one key-value head, layer types in an order of their own, the released cap
    "mixed_layers": dict(
        vocab_size=131,
        hidden_size=42,
        intermediate_size=70,
        num_hidden_layers=5,
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=14,
        query_pre_attn_scalar=14,
        sliding_window=5,
        attn_logit_softcapping=50.0,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention", "full_attention"],
    ),
    # gemma-2-2b's widths, two layers: its head_dim, scalar, cap and window (longer than any caption here)
    "released_widths": dict(
        vocab_size=1000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
    ),
}
SMALL_CONFIGS = ["odd", "mixed_layers"]
# padded length (a multiple of 8, as the original pads) and valid tokens per row
CASES = {"length8": (8, [8, 3]), "length16": (16, [16, 5, 11])}
FLOAT32_BOUND = 1e-5
# Gemma's tier (test_gemma.py): bfloat16 weights and compute against the float32 reference; measured 1.1e-2 to
# 2.6e-2 (float32: 0.7e-6 to 2.4e-6). Not at mixed_layers, whose four layers of random weights amplify rounding:
# there transformers' own bfloat16 forward is 3.8e-2 to 9.5e-2 off its float32.
BFLOAT16_BOUND = 3e-2
BFLOAT16_CONFIGS = ["odd", "released_widths"]


def random_gemma2(seed: int, **config) -> transformers.Gemma2Model:
    """A Gemma2Model with every parameter random, its norm weights (offsets from 1, zero at init) included."""
    with no_init_weights():
        model = transformers.Gemma2Model(transformers.Gemma2Config(**config))
    return randomize_(model.eval(), seed)


def reference_features(model: transformers.Gemma2Model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    return out.hidden_states[-2].numpy()


@pytest.fixture(scope="module")
def saved_references(tmp_path_factory):
    """name -> a saved reference, its expected features per case, and our encoder loaded from it in both
    dtypes; each built once for the module."""
    built = {}

    def get(name: str):
        if name not in built:
            config = CONFIGS[name]
            reference = random_gemma2(len(name), **config)
            folder = tmp_path_factory.mktemp(name)
            reference.save_pretrained(folder)
            cases = {}
            for seed, (case, (length, valid)) in enumerate(CASES.items()):
                ids, mask = token_inputs(seed, config["vocab_size"], length, valid)
                cases[case] = ids, mask, reference_features(reference, ids, mask)
            encoders = {dtype: load_text_encoder(folder, dtype, progress=False) for dtype in ("float32", "bfloat16")}
            built[name] = reference, folder, cases, encoders
        return built[name]

    yield get
    built.clear()


@pytest.fixture(params=list(CONFIGS))
def parity(request, saved_references):
    return saved_references(request.param)


@pytest.fixture(params=SMALL_CONFIGS)
def small(request, saved_references):
    """Where the window, the scalar and the cap all matter, and checks run fast."""
    return saved_references(request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_transformers_at_every_position(parity, case):
    _, _, cases, encoders = parity
    ids, mask, expected = cases[case]
    assert type(encoders["float32"]) is Gemma2Encoder
    ours = encode(encoders["float32"], ids, mask)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    assert relative_error(ours, expected) <= FLOAT32_BOUND


@pytest.mark.parametrize("name", BFLOAT16_CONFIGS)
@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_within_tier(saved_references, name, case):
    _, _, cases, encoders = saved_references(name)
    ids, mask, expected = cases[case]
    assert encoders["bfloat16"].embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert relative_error(encode(encoders["bfloat16"], ids, mask), expected) <= BFLOAT16_BOUND


@pytest.mark.parametrize(
    "change", [dict(attn_logit_softcapping=None), dict(sliding_window=64), dict(query_pre_attn_scalar=256)]
)
def test_what_gemma2_adds_to_gemma_changes_the_features(small, change):
    """The cap, the window and query_pre_attn_scalar each move these features far past the bound, so the
    parity above checks each of them."""
    reference, _, cases, _ = small
    ids, mask, expected = cases["length16"]
    altered = random_gemma2(0, **{**reference.config.to_dict(), **change})
    altered.load_state_dict(reference.state_dict())
    assert relative_error(reference_features(altered, ids, mask), expected) > 1000 * FLOAT32_BOUND


def test_rows_without_any_token_to_attend_match_transformers(small):
    """An all-padding row and a left-padded row leave queries with no key: transformers' eager attention, which
    Gemma-2 runs, averages every value for them (Gemma's SDPA gives zeros)."""
    reference, _, cases, encoders = small
    ids = cases["length8"][0]
    mask = np.array([[0] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    assert reference.config._attn_implementation == "eager"
    expected = reference_features(reference, ids, mask)
    assert relative_error(encode(encoders["float32"], ids, mask), expected) <= FLOAT32_BOUND


def test_unrolled_layers_match_transformers(small):
    _, folder, cases, _ = small
    ids, mask, expected = cases["length16"]
    unrolled = load_text_encoder(folder, scan_layers=False, progress=False)
    assert relative_error(encode(unrolled, ids, mask), expected) <= FLOAT32_BOUND


def test_pipeline_captions_tokenized_as_the_references_tokenize_them(parity, tmp_path):
    """Captions after the system prompt, right-padded (both references set padding_side "right"), as diffusers'
    Lumina2Pipeline encodes them; the tokenizer folder set to pad on the left, as gemma-2-2b's may be."""
    reference, folder, _, encoders = parity
    tokenizer = build_tokenizer(["a red fox in the snow", "two cats", "you are an assistant <Prompt Start>"])
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path)
    config = encoders["float32"].config
    loaded = config.load_tokenizer(tmp_path)
    assert loaded.padding_side == "right"
    captions = config.prepare_captions(["a red fox in the snow", "two cats"])
    assert captions[1] == SYSTEM_PROMPTS["real"] + PROMPT_START + "two cats"
    tokens = loaded(captions, padding=True, pad_to_multiple_of=8, max_length=256, truncation=True, return_tensors="np")
    ids = np.minimum(tokens.input_ids, reference.config.vocab_size - 1)
    mask = tokens.attention_mask
    assert mask[1, -1] == 0 and mask[:, 0].all()  # right padding: the second row ends in padding
    expected = reference_features(reference, ids, mask)
    assert relative_error(encode(encoders["float32"], ids, mask), expected) <= FLOAT32_BOUND


def test_the_default_system_prompt_is_diffusers():
    from diffusers import Lumina2Pipeline

    assert SYSTEM_PROMPTS["real"] in Lumina2Pipeline.__init__.__code__.co_consts  # self.system_prompt = "..."


def test_convert_then_load_loses_nothing(small, tmp_path):
    reference, folder, cases, encoders = small
    ids, mask, _ = cases["length8"]
    out = convert_gemma2(folder, tmp_path / "converted", progress=False)
    assert orbax_io.is_converted(out)
    converted = load_text_encoder(out, progress=False)
    assert converted.config == encoders["float32"].config
    np.testing.assert_array_equal(encode(converted, ids, mask), encode(encoders["float32"], ids, mask))
    exported = transformers_state_dict(converted)  # the last layer and the final norm, which never run, too
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert exported.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_pipeline_folder_and_causal_lm_keys_load(small, tmp_path):
    _, folder, cases, encoders = small
    ids, mask, _ = cases["length8"]
    expected = encode(encoders["float32"], ids, mask)
    shutil.copytree(folder, tmp_path / "pipeline" / "text_encoder")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    np.testing.assert_array_equal(encode(load_text_encoder(tmp_path / "pipeline", progress=False), ids, mask), expected)
    causal_lm = tmp_path / "causal_lm"  # google/gemma-2-2b's layout: everything under model., lm_head tied
    causal_lm.mkdir()
    shutil.copy(folder / "config.json", causal_lm)
    save_file(
        {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}, causal_lm / "model.safetensors"
    )
    np.testing.assert_array_equal(encode(load_text_encoder(causal_lm, progress=False), ids, mask), expected)


def test_misnamed_and_misshaped_keys_are_named(small, tmp_path):
    _, folder, _, _ = small
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["layers.1.pre_feedforward_layernorm.scale"] = tensors.pop("layers.1.pre_feedforward_layernorm.weight")
    tensors["layers.0.post_feedforward_layernorm.weight"] = tensors["layers.0.post_feedforward_layernorm.weight"][:-1]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_text_encoder(tmp_path, progress=False)
    message = str(error.value)
    assert str(tmp_path) in message and "Gemma-2" in message
    assert "unknown keys (1): layers.1.pre_feedforward_layernorm.scale" in message
    assert "missing parameters (1): layers.pre_feedforward_layernorm.weight (layer 1)" in message
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    assert f"layers.0.post_feedforward_layernorm.weight ({hidden - 1},) (expected ({hidden},))" in message


def test_examples_of_the_key_map():
    assert gemma2_key_to_target("model.layers.3.pre_feedforward_layernorm.weight") == Target(
        ("layers", "pre_feedforward_layernorm", "weight"), 3
    )
    assert gemma2_key_to_target("layers.0.post_feedforward_layernorm.weight") == Target(
        ("layers", "post_feedforward_layernorm", "weight"), 0
    )
    assert gemma2_key_to_target("layers.2.input_layernorm.weight") == Target(("layers", "input_layernorm", "weight"), 2)
    for key in ("lm_head.weight", "layers.0.pre_feedforward_layernorm.bias", "layers.0.mlp.up_proj.bias"):
        with pytest.raises(UnknownKeyError):
            gemma2_key_to_target(key)


def test_released_gemma_2_2b_parameters():
    shapes = GEMMA2.parameter_shapes(GEMMA_2_2B)
    assert shapes[("embed_tokens", "embedding")] == (256000, 2304)
    assert shapes[("layers", "self_attn", "k_proj", "kernel")] == (26, 2304, 1024)
    assert shapes[("layers", "post_feedforward_layernorm", "weight")] == (26, 2304)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 2_614_341_888  # gemma-2-2b without its tied LM head


def test_config_reads_transformers_files(tmp_path):
    # gemma-2 as transformers 4.42 wrote it (google's files): hidden_act, sliding_window_size, cache_implementation
    v4 = dict(
        architectures=["Gemma2ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        attn_logit_softcapping=50.0,
        bos_token_id=2,
        cache_implementation="hybrid",
        eos_token_id=1,
        final_logit_softcapping=30.0,
        head_dim=256,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        hidden_size=2304,
        initializer_range=0.02,
        intermediate_size=9216,
        max_position_embeddings=8192,
        model_type="gemma2",
        num_attention_heads=8,
        num_hidden_layers=26,
        num_key_value_heads=4,
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_theta=10000.0,
        sliding_window=4096,
        sliding_window_size=4096,
        torch_dtype="float32",
        transformers_version="4.42.4",
        use_cache=True,
        vocab_size=256000,
    )
    config = Gemma2Config.from_dict(v4)
    assert config == Gemma2Config(hidden_act="gelu_pytorch_tanh") and config.layer_types[:2] == (
        "sliding_attention",
        "full_attention",
    )
    assert Gemma2Config.from_dict(json.loads(json.dumps(GEMMA_2_2B.to_dict()))) == GEMMA_2_2B
    transformers.Gemma2Config(**CONFIGS["mixed_layers"], rope_theta=500.0).save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    config = Gemma2Config.from_dict(v5)
    assert config.rope_theta == 500.0 and config.layer_types == tuple(CONFIGS["mixed_layers"]["layer_types"])
    assert text_encoder_model(config) is Gemma2Encoder


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gemma"), "model_type 'gemma' is not supported; this encoder is Gemma-2"),
        (dict(sliding_window_size=512), "sliding_window_size 512 contradicts sliding_window 4096"),
        (dict(layer_types=["full_attention"] * 3), "layer_types must name 26 layers"),
        (dict(layer_types=["chunked_attention"] * 26), "each one of"),
        (dict(hidden_activation="gelu"), "tanh-approximated GELU"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
        (dict(final_logit_softcap=30.0), r"unknown Gemma-2 config fields \['final_logit_softcap'\]"),
    ],
)
def test_config_refuses_what_it_does_not_compute(change, message):
    with pytest.raises(ValueError, match=message):
        Gemma2Config.from_dict({**GEMMA_2_2B.to_dict(), **change})

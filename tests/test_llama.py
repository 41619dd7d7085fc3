"""The LLaMA text encoder of Lumina-T2I against transformers' LlamaModel (last_hidden_state, as the original
takes it), every parameter randomised, through the real import path; the causal LM's layout (the hub's
meta-llama/Llama-2-7b-hf) and the key coverage of LLaMA-2-7B."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from reference import ShapeOnly, randomize_, relative_error
from test_gemma import encode, token_inputs
from transformers.initialization import no_init_weights

from lumina_jax.models.llama import LLAMA_2_7B, LlamaConfig, LlamaEncoder
from lumina_jax.weights.importer import Checkpoint
from lumina_jax.weights.llama import LLAMA, load_llama
from lumina_jax.weights.text_encoder import load_text_encoder

# biases on, to cover attention_bias; kv heads shared by two query heads each
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_bias=True,
    rms_norm_eps=1e-5,
)
FLOAT32_BOUND = 1e-5
BFLOAT16_BOUND = 3e-2  # as Gemma's tier: bfloat16 weights and compute against the float32 reference


def random_llama(seed: int, causal_lm: bool, **config):
    """A LlamaModel (or LlamaForCausalLM, with its own lm_head) with every parameter random, norms included."""
    kind = transformers.LlamaForCausalLM if causal_lm else transformers.LlamaModel
    with no_init_weights():
        model = kind(transformers.LlamaConfig(**config, tie_word_embeddings=False))
    return randomize_(model.eval(), seed)


def last_hidden_state(model, ids, mask=None) -> np.ndarray:
    base = getattr(model, "model", model)
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return base(torch.from_numpy(ids), **kwargs).last_hidden_state.numpy()


@pytest.fixture(scope="module", params=["LlamaModel", "LlamaForCausalLM"])
def saved(request, tmp_path_factory):
    reference = random_llama(3, request.param == "LlamaForCausalLM", **TINY)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return reference, folder


@pytest.mark.parametrize("length, valid", [(8, [8, 3]), (16, [16, 5, 11])])
def test_float32_matches_transformers_at_every_position(saved, length, valid):
    reference, folder = saved
    encoder = load_llama(folder, "float32", progress=False)
    assert isinstance(encoder, LlamaEncoder) and encoder.config.head_dim == 16
    ids, mask = token_inputs(length, TINY["vocab_size"], length, valid)
    expected = last_hidden_state(reference, ids, mask)
    ours = encode(encoder, ids, mask)
    assert ours.shape == expected.shape and relative_error(ours, expected) <= FLOAT32_BOUND
    # The original passes no mask: with right padding the real tokens' features are the same.
    unmasked = last_hidden_state(reference, ids)
    for row, count in enumerate(valid):
        assert relative_error(ours[row, :count], unmasked[row, :count]) <= FLOAT32_BOUND
    bfloat16 = encode(load_llama(folder, "bfloat16", progress=False), ids, mask)
    assert relative_error(bfloat16, expected) <= BFLOAT16_BOUND


def test_load_text_encoder_loads_the_encoder_its_config_names(saved):
    """The public loader is not Gemma's alone: a LLaMA folder loads as the LLaMA encoder, as load_llama loads it."""
    _, folder = saved
    encoder = load_text_encoder(folder, progress=False)
    assert isinstance(encoder, LlamaEncoder)
    ids, mask = token_inputs(0, TINY["vocab_size"], 8, [8, 4])
    np.testing.assert_array_equal(encode(encoder, ids, mask), encode(load_llama(folder, progress=False), ids, mask))


def test_load_text_encoder_names_a_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not a supported text encoder config: Expecting property"):
        load_text_encoder(tmp_path)


def test_unrolled_layers_match_transformers(saved):
    reference, folder = saved
    ids, mask = token_inputs(0, TINY["vocab_size"], 8, [8, 4])
    unrolled = encode(load_llama(folder, scan_layers=False, progress=False), ids, mask)
    assert relative_error(unrolled, last_hidden_state(reference, ids, mask)) <= FLOAT32_BOUND


def test_llama_2_7b_keys_cover_every_parameter():
    """The hub's checkpoint is a LlamaForCausalLM: model.-prefixed keys and an lm_head, which is left out."""
    with torch.device("meta"):
        # meta-llama/Llama-2-7b-hf's config.json: transformers' defaults (LLaMA-7B's) but for these two
        reference = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5)
        )
    tensors = {k: ShapeOnly(tuple(v.shape)) for k, v in reference.state_dict().items()}
    assert "lm_head.weight" in tensors and "model.norm.weight" in tensors
    config = LlamaConfig.from_dict(reference.config.to_diff_dict())  # what its config.json holds
    assert config == LLAMA_2_7B
    del tensors["lm_head.weight"]  # as LLAMA.find leaves it out
    plan = LLAMA.plan(Checkpoint(Path("Llama-2-7b-hf"), config, tensors))
    assert len(plan) == len(tensors) == 2 + 32 * 9


def test_config_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_dict({"rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        LlamaConfig.from_dict({"model_type": "mistral"})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LlamaConfig.from_dict({"hidden_act": "gelu"})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "contradicts"),
        (dict(use_bidirectional_attention=True), "LLaMA attention here is causal"),
    ],
)
def test_config_refuses_what_gemma_refuses(change, message):
    """Gemma's and LLaMA's config.json are read by one function (`models.decoder.transformers_config`)."""
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_dict({**LLAMA_2_7B.to_dict(), **change})

"""Adapters trained here (`models.lora`), written as PEFT LoRA files in diffusers' names, load into the PyTorch
models and give our output there: Lumina-Image 2.0's through Lumina2Pipeline.load_lora_weights, Lumina-Next's
(diffusers has no loader for it) through peft on LuminaNextDiT2DModel. Every base and adapter parameter
random, float32; the adapters on every kind of layer, the targets named several ways."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from reference import TINY_NEXT_DIT, inputs, random_transformer, randomize_, relative_error, transformer_forward
from safetensors import safe_open
from sharding_checks import randomize_adapters_
from test_lora import LUMINA2, _lumina2_inputs, _lumina2_reference

from lumina_jax import load_transformer
from lumina_jax.models.lora import add_adapters
from lumina_jax.weights.lora import merge_lora, save_lora

FLOAT32_BOUND = 1e-5


def read_peft_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    return tensors, {key.removeprefix("transformer."): value for key, value in metadata.items()}


@pytest.fixture(scope="module")
def next_dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("next_dit")
    random_transformer(seed=6, sample_size=16, **TINY_NEXT_DIT).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("targets", "rank", "alpha"), [(["attention", "feed_forward", "modulation"], 4, 6.0), (["to_q", "down"], 3, 3.0)]
)
def test_a_next_dit_export_loads_into_peft_and_gives_our_output(next_dit, tmp_path, targets, rank, alpha):
    from diffusers import LuminaNextDiT2DModel

    ours = load_transformer(next_dit, progress=False)
    x, t, caption, mask = inputs(4, 2, 8, 6, 5, TINY_NEXT_DIT["cross_attention_dim"], [5, 2])
    arguments = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask))
    before = np.asarray(ours(*arguments))
    add_adapters(ours, targets, rank, alpha, key=jax.random.PRNGKey(0))
    randomize_adapters_(ours, seed=1)
    expected = np.asarray(ours(*arguments))
    assert relative_error(expected, before) > 1e-2  # the adapters change the output

    tensors, config = read_peft_file(save_lora(ours, tmp_path / "adapter.safetensors"))
    assert config["r"] == rank and config["lora_alpha"] == alpha
    reference = LuminaNextDiT2DModel.from_pretrained(next_dit).eval()
    inject_adapter_in_model(LoraConfig(**config), reference)
    result = set_peft_model_state_dict(reference, {key.removeprefix("transformer."): v for key, v in tensors.items()})
    assert not result.unexpected_keys
    adapted = [name for name, _ in reference.named_parameters() if "lora_A" in name]
    assert len(adapted) == len(tensors) // 2  # every tensor of the file is in the model
    assert relative_error(expected, transformer_forward(reference, x, t, caption, mask)) <= FLOAT32_BOUND

    # and our own loader merges it back into what the unmerged adapters computed
    merged = merge_lora(load_transformer(next_dit, progress=False), tmp_path / "adapter.safetensors")
    assert relative_error(merged(*arguments), expected) <= FLOAT32_BOUND


def test_a_lumina2_export_loads_with_lumina2_pipeline_and_gives_our_output(tmp_path):
    folder = tmp_path / "transformer"
    randomize_(Lumina2Transformer2DModel(**LUMINA2).eval(), seed=7).save_pretrained(folder)
    ours = load_transformer(folder, progress=False)
    adapted = add_adapters(ours, ["attention", "feed_forward", "modulation"], 4, 8.0, key=jax.random.PRNGKey(2))
    assert {path[0] for path in adapted} == {"layers", "noise_refiner", "context_refiner"}
    randomize_adapters_(ours, seed=3)
    arrays = _lumina2_inputs(2)
    expected = np.asarray(ours(*map(jnp.asarray, arrays)))
    (tmp_path / "lora").mkdir()
    tensors, _ = read_peft_file(save_lora(ours, tmp_path / "lora" / "pytorch_lora_weights.safetensors"))

    pipe = Lumina2Pipeline(
        transformer=Lumina2Transformer2DModel.from_pretrained(folder).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="ours")
    loaded = {name.replace(".ours", "") for name, _ in pipe.transformer.named_parameters() if "lora_" in name}
    assert loaded == {key.removeprefix("transformer.") for key in tensors}  # every tensor, and no other
    assert relative_error(expected, _lumina2_reference(pipe.transformer, arrays)) <= FLOAT32_BOUND

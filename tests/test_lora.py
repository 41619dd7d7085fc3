"""LoRA files merged into our transformers give what PEFT's adapters give diffusers' models: every base and
adapter parameter randomised, float32, in diffusers' (PEFT), ComfyUI's and kohya's layouts."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from reference import (
    TINY_NEXT_DIT,
    inputs,
    random_transformer,
    randomize_,
    randomize_lora_,
    relative_error,
    transformer_forward,
)
from safetensors.numpy import save_file

from lumina_jax import load_transformer
from lumina_jax.weights.lora import merge_lora

FLOAT32_BOUND = 1e-5
LUMINA2 = dict(
    hidden_size=96,
    num_layers=2,
    num_refiner_layers=1,
    num_attention_heads=6,
    num_kv_heads=2,
    multiple_of=32,
    in_channels=4,
    axes_dim_rope=(4, 6, 6),
    cap_feat_dim=24,
)
# Every linear layer diffusers' Lumina2Transformer2DModel has in its blocks and head (linear_1 also takes the
# timestep embedder's and the output head's).
LUMINA2_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "linear_1", "linear_2", "linear_3", "norm1.linear"]


def _lumina2_inputs(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 6, 8), dtype=np.float32)
    t = np.array([0.3, 0.8], np.float32)
    caption = rng.standard_normal((2, 5, LUMINA2["cap_feat_dim"]), dtype=np.float32)
    mask = (np.arange(5)[None] < np.array([[5], [3]])).astype(np.int64)
    return x, t, caption, mask


def _lumina2_reference(model, arrays) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in arrays), return_dict=False)[0].numpy()


@pytest.fixture(scope="module")
def lumina2(tmp_path_factory):
    """A random Lumina2Transformer2DModel saved in diffusers' layout, and our model's output without an adapter."""
    folder = tmp_path_factory.mktemp("lumina2")
    randomize_(Lumina2Transformer2DModel(**LUMINA2).eval(), seed=3).save_pretrained(folder)
    return folder


def _adapted_lumina2(folder, config: LoraConfig, seed: int) -> Lumina2Transformer2DModel:
    model = Lumina2Transformer2DModel.from_pretrained(folder).eval()
    inject_adapter_in_model(config, model)
    randomize_lora_(model, seed)
    return model


def test_a_diffusers_lora_merged_gives_peft_s_output(lumina2, tmp_path):
    """Lumina2Pipeline.save_lora_weights' file (alpha and an alpha_pattern in its metadata) at two scales."""
    config = LoraConfig(r=4, lora_alpha=6, alpha_pattern={"to_out.0": 2}, target_modules=LUMINA2_TARGETS)
    adapted = _adapted_lumina2(lumina2, config, seed=5)
    Lumina2Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(adapted),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    arrays = _lumina2_inputs(0)
    base = load_transformer(lumina2, progress=False)
    before = np.asarray(base(*map(jnp.asarray, arrays)))
    model = merge_lora(load_transformer(lumina2, progress=False), tmp_path / "pytorch_lora_weights.safetensors")
    expected = _lumina2_reference(adapted, arrays)
    assert relative_error(before, expected) > 1e-2  # the adapter changes the output
    assert relative_error(model(*map(jnp.asarray, arrays)), expected) <= FLOAT32_BOUND
    # at scale 0.5, what PEFT's scaled adapter gives
    half = merge_lora(load_transformer(lumina2, progress=False), tmp_path / "pytorch_lora_weights.safetensors", 0.5)
    for name, module in adapted.named_modules():
        if hasattr(module, "scaling"):
            module.scaling = {key: value * 0.5 for key, value in module.scaling.items()}
    assert relative_error(half(*map(jnp.asarray, arrays)), _lumina2_reference(adapted, arrays)) <= FLOAT32_BOUND


def _original_layout_lora(folder, rank: int, seed: int) -> dict[str, np.ndarray]:
    """A LoRA in the original code's names, as ComfyUI and ai-toolkit write them: a fused qkv adapter per block,
    shaped after the diffusers model at `folder`."""
    shapes = {
        key: tuple(value.shape) for key, value in Lumina2Transformer2DModel.from_pretrained(folder).state_dict().items()
    }
    names = {"attention.out": "attn.to_out.0", "adaLN_modulation.1": "norm1.linear"}
    names |= {f"feed_forward.w{i}": f"feed_forward.linear_{i}" for i in (1, 2, 3)}
    rng = np.random.default_rng(seed)
    lora = {}
    for stack, depth in [("layers", 2), ("noise_refiner", 1), ("context_refiner", 1)]:
        for i in range(depth):
            modules = {
                "attention.qkv": (
                    shapes[f"{stack}.{i}.attn.to_q.weight"][1],
                    sum(shapes[f"{stack}.{i}.attn.{part}.weight"][0] for part in ("to_q", "to_k", "to_v")),
                )
            }
            for original, diffusers in names.items():
                if f"{stack}.{i}.{diffusers}.weight" in shapes:
                    fan_out, fan_in = shapes[f"{stack}.{i}.{diffusers}.weight"]
                    modules[original] = (fan_in, fan_out)
            for module, (fan_in, fan_out) in modules.items():
                name = f"diffusion_model.{stack}.{i}.{module}"
                lora[f"{name}.lora_A.weight"] = 0.2 * rng.standard_normal((rank, fan_in), dtype=np.float32)
                lora[f"{name}.lora_B.weight"] = 0.2 * rng.standard_normal((fan_out, rank), dtype=np.float32)
    return lora


def _to_peft(lora: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The original-layout LoRA in diffusers' names, as diffusers' _convert_non_diffusers_lumina2_lora_to_diffusers
    renames and splits it (that converter's split is fixed to the released widths, 2304 / 768 / 768)."""
    query, kv = LUMINA2["hidden_size"], 2 * LUMINA2["hidden_size"] // 6
    names = {"attention.out": "attn.to_out.0", "adaLN_modulation.1": "norm1.linear"}
    names |= {f"feed_forward.w{i}": f"feed_forward.linear_{i}" for i in (1, 2, 3)}
    converted = {}
    for key, value in lora.items():
        name = key.removeprefix("diffusion_model.")
        block, module, part = name.split(".", 2)[:2], name.split(".", 2)[2].rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        prefix = ".".join(block)
        if module == "attention.qkv":
            rows = {"to_q": (0, query), "to_k": (query, query + kv), "to_v": (query + kv, query + 2 * kv)}
            for target, (start, stop) in rows.items():
                converted[f"{prefix}.attn.{target}.{part}.weight"] = value if part == "lora_A" else value[start:stop]
        else:
            converted[f"{prefix}.{names[module]}.{part}.weight"] = value
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in converted.items()}


@pytest.mark.parametrize("layout", ["comfyui", "kohya"])
def test_original_layout_loras_merged_give_peft_s_output(lumina2, tmp_path, layout):
    """ComfyUI / ai-toolkit: `diffusion_model.` and the original names, the fused qkv split; kohya: the same
    names with underscores, lora_down / lora_up, and an alpha (here half the rank)."""
    rank, alpha = 4, (4 if layout == "comfyui" else 2)
    lora = _original_layout_lora(lumina2, rank, seed=9)
    targets = sorted({key.split(".lora_")[0].removeprefix("diffusion_model.") for key in lora})
    reference = Lumina2Transformer2DModel.from_pretrained(lumina2).eval()
    peft_lora = _to_peft(lora)
    peft_targets = sorted({key.split(".lora_")[0] for key in peft_lora})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=peft_targets), reference)
    assert not set_peft_model_state_dict(reference, peft_lora).unexpected_keys
    if layout == "kohya":
        renamed = {}
        for module in targets:
            kohya = "lora_unet_" + module.replace(".", "_")
            renamed[f"{kohya}.lora_down.weight"] = lora[f"diffusion_model.{module}.lora_A.weight"]
            renamed[f"{kohya}.lora_up.weight"] = lora[f"diffusion_model.{module}.lora_B.weight"]
            renamed[f"{kohya}.alpha"] = np.array(alpha, np.float32)
        lora = renamed
    save_file(lora, tmp_path / "lora.safetensors")
    model = merge_lora(load_transformer(lumina2, progress=False), tmp_path / "lora.safetensors")
    arrays = _lumina2_inputs(1)
    assert relative_error(model(*map(jnp.asarray, arrays)), _lumina2_reference(reference, arrays)) <= FLOAT32_BOUND


NEXT_DIT_TARGETS = ["to_k", "to_v", "to_out.0", "linear_1", "linear_2", "linear_3", "norm1.linear"]


@pytest.fixture(scope="module")
def next_dit(tmp_path_factory):
    """A random LuminaNextDiT2DModel (its two query copies equal, as released) saved in diffusers' layout."""
    folder = tmp_path_factory.mktemp("nextdit")
    random_transformer(seed=4, sample_size=16, **TINY_NEXT_DIT).save_pretrained(folder)
    return folder


def _save_diffusers_lora(model, config: LoraConfig, path) -> None:
    """diffusers' layout for a Next-DiT LoRA (diffusers has no Lumina-Next loader): `transformer.` and PEFT's keys."""
    tensors = {f"transformer.{key}": value.numpy() for key, value in get_peft_model_state_dict(model).items()}
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)})


def test_a_next_dit_lora_merged_gives_peft_s_output(next_dit, tmp_path):
    folder = next_dit
    config = LoraConfig(r=3, lora_alpha=5, target_modules=NEXT_DIT_TARGETS)
    adapted = random_transformer(seed=4, sample_size=16, **TINY_NEXT_DIT)
    inject_adapter_in_model(config, adapted)
    randomize_lora_(adapted, seed=6)
    _save_diffusers_lora(adapted, config, tmp_path / "lora.safetensors")
    model = merge_lora(load_transformer(folder, progress=False), tmp_path / "lora.safetensors")
    x, t, caption, mask = inputs(2, 2, 8, 6, 5, TINY_NEXT_DIT["cross_attention_dim"], [5, 2])
    ours = model(*map(jnp.asarray, (x, t, caption, mask)))
    assert relative_error(ours, transformer_forward(adapted, x, t, caption, mask)) <= FLOAT32_BOUND


def test_next_dit_s_shared_query_takes_one_adapter(next_dit, tmp_path):
    """diffusers' Next-DiT holds the query twice (attn1, attn2), ours once: equal adapters on both merge once;
    different ones are refused, naming them."""
    folder = next_dit
    adapted = random_transformer(seed=4, sample_size=16, **TINY_NEXT_DIT)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
    inject_adapter_in_model(config, adapted)
    randomize_lora_(adapted, seed=7)
    _save_diffusers_lora(adapted, config, tmp_path / "different.safetensors")
    with pytest.raises(ValueError, match=r"layers\.0\.attn[12]\.to_q and layers\.0\.attn[12]\.to_q adapt one shared"):
        merge_lora(load_transformer(folder, progress=False), tmp_path / "different.safetensors")
    with torch.no_grad():
        for block in adapted.layers:
            block.attn2.to_q.load_state_dict(block.attn1.to_q.state_dict())
    _save_diffusers_lora(adapted, config, tmp_path / "equal.safetensors")
    model = merge_lora(load_transformer(folder, progress=False), tmp_path / "equal.safetensors")
    x, t, caption, mask = inputs(3, 1, 4, 4, 4, TINY_NEXT_DIT["cross_attention_dim"], [3])
    ours = model(*map(jnp.asarray, (x, t, caption, mask)))
    assert relative_error(ours, transformer_forward(adapted, x, t, caption, mask)) <= FLOAT32_BOUND


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "transformer.layers.0.attn.to_x.lora_A.weight": (4, 96),
                "transformer.layers.0.attn.to_x.lora_B.weight": (96, 4),
            },
            r"fit no weight of the transformer: \['layers\.0\.attn\.to_x'\]",
        ),
        (
            {
                "transformer.layers.0.attn.to_q.lora_A.weight": (4, 90),
                "transformer.layers.0.attn.to_q.lora_B.weight": (96, 4),
            },
            r"layers\.0\.attn\.to_q gives layers\.0\.attn\.to_q\.weight a delta of shape \(96, 90\); "
            r"the weight is \(96, 96\)",
        ),
        (
            {
                "transformer.layers.7.attn.to_q.lora_A.weight": (4, 96),
                "transformer.layers.7.attn.to_q.lora_B.weight": (96, 4),
            },
            r"layers\.7\.attn\.to_q is past the transformer's 2 layers",
        ),
        ({"transformer.layers.0.attn.to_q.lora_A.weight": (4, 96)}, r"layers\.0\.attn\.to_q has no lora_B"),
        ({"transformer.layers.0.attn.to_q.weight": (96, 96)}, r"is not a LoRA weight"),
    ],
)
def test_files_that_do_not_fit_are_refused_naming_the_key(lumina2, tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file({key: np.zeros(shape, np.float32) for key, shape in tensors.items()}, path)
    with pytest.raises(ValueError, match=message) as error:
        merge_lora(load_transformer(lumina2, progress=False), path)
    assert str(path) in str(error.value)

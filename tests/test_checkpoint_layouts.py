"""Loading Next-DiT weights from every layout users bring, and the errors for the ones we refuse."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LuminaNextDiT2DModel
from reference import TINY_NEXT_DIT, inputs, random_transformer, relative_error, transformer_forward
from safetensors.numpy import load_file, save_file

from lumina_jax import load_transformer
from lumina_jax.models.nextdit import patchify_padded, unpatchify
from lumina_jax.models.rope import rope_frequencies
from lumina_jax.weights.nextdit import build_model, find_checkpoint, save_diffusers
from lumina_jax.weights.nextdit_keys import original_key_to_diffusers
from lumina_jax.weights.safetensors_io import SafetensorsTensor
from lumina_jax.weights.torch_pickle import UnsafeCheckpointError

ORIGINAL = Path(__file__).parent / "fixtures" / "lumina_next_original_tiny"
IO = dict(np.load(ORIGINAL / "io.npz"))
FLOAT32_BOUND = 1e-5


def run(model, x, t=IO["a_t"], caption=IO["a_cap"], mask=IO["a_cap_mask"], **factors):
    return np.array(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask), **factors))


@pytest.fixture(scope="module")
def original_model():
    return load_transformer(ORIGINAL, progress=False)


def test_original_checkpoint_matches_the_original_code(original_model):
    assert original_model.config.num_attention_heads == 6 and original_model.config.kv_heads == 2
    assert original_model.config.sample_size == 32  # model_args.image_size 256 / 8
    out = run(original_model, IO["a_x"])[:, :4]  # the original drops the learned-sigma half
    assert relative_error(out, IO["a_out"]) <= FLOAT32_BOUND


@pytest.mark.parametrize("stage", ["early", "late"])
def test_original_cfg_with_resolution_scaling_and_proportional_attention(original_model, stage):
    # forward_with_cfg(cfg 4, scale_factor 1.5, watershed 0.3, base_seqlen 16): linear RoPE scaling
    # before the watershed, NTK after; guidance on channels 0..2 only.
    t = IO[f"b_{stage}_t"]
    linear, ntk = (1.5, 1.0) if t[0] < 0.3 else (1.0, 1.5)
    x = np.concatenate([IO["a_x"][:1]] * 2)
    out = run(original_model, x, t, linear_factor=linear, ntk_factor=ntk, base_sequence_length=16)[:, :4]
    guided = out[1, :3] + 4.0 * (out[0, :3] - out[1, :3])
    out[:, :3] = guided
    assert relative_error(out, IO[f"b_{stage}_out"]) <= FLOAT32_BOUND


def forward_images(model, images, t=IO["a_t"], caption=IO["a_cap"], mask=IO["a_cap_mask"]):
    patches, positions, token_mask = patchify_padded(images, 2)
    rope = rope_frequencies(positions, model.config.head_dim)
    return model.forward_tokens(patches, rope, token_mask, jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask))


def test_images_of_different_shapes_in_one_batch(original_model):
    images = [jnp.asarray(IO["c_x0"]), jnp.asarray(IO["c_x1"])]  # 4x6 and 8x3 tokens
    out = forward_images(original_model, images)
    for i, image in enumerate(images):
        _, h, w = image.shape
        ours = unpatchify(out[i : i + 1, : (h // 2) * (w // 2)], h, w, 2)[0, :4]
        assert relative_error(ours, IO[f"c_out{i}"]) <= FLOAT32_BOUND


def test_padding_never_reaches_the_real_tokens(original_model):
    small, large = jnp.asarray(IO["c_x0"][:, :4, :6]), jnp.asarray(IO["c_x1"])  # 6 and 24 tokens
    patches, positions, mask = patchify_padded([small, large], 2)
    assert mask.shape == (2, 24) and int(mask[0].sum()) == 6 and bool(mask[1].all())
    np.testing.assert_array_equal(np.asarray(positions[0, 6:]), np.tile([[1, 2]], (18, 1)))  # last position repeated
    padded = forward_images(original_model, [small, large])
    alone = forward_images(original_model, [small], IO["a_t"][:1], IO["a_cap"][:1], IO["a_cap_mask"][:1])
    assert relative_error(padded[0, :6], alone[0]) <= FLOAT32_BOUND


def test_pth_and_safetensors_give_the_same_model(tmp_path, original_model):
    (tmp_path / "model_args.pth").write_bytes((ORIGINAL / "model_args.pth").read_bytes())
    shutil.copy(ORIGINAL / "consolidated.00-of-01.pth", tmp_path)
    from_pth = load_transformer(tmp_path, progress=False)
    np.testing.assert_array_equal(run(from_pth, IO["a_x"]), run(original_model, IO["a_x"]))


def test_ema_weights_are_selected(original_model):
    ema = load_transformer(ORIGINAL, ema=True, progress=False)
    expected = load_file(ORIGINAL / "consolidated_ema.00-of-01.safetensors")
    np.testing.assert_array_equal(np.asarray(ema.pad_token[...]), expected["pad_token"])
    np.testing.assert_array_equal(np.asarray(ema.layers.attention.gate[...][2]), expected["layers.2.attention.gate"])
    assert not np.array_equal(run(ema, IO["a_x"]), run(original_model, IO["a_x"]))


def diffusers_from_original(folder: Path) -> LuminaNextDiT2DModel:
    """The fixture's weights under diffusers' names, in diffusers' own module (the query stored twice)."""
    state = {
        original_key_to_diffusers(k): torch.from_numpy(v)
        for k, v in load_file(ORIGINAL / "consolidated.00-of-01.safetensors").items()
    }
    for key in [k for k in state if ".attn1.to_q." in k or ".attn1.norm_q." in k]:
        state[key.replace("attn1", "attn2")] = state[key]
    config = find_checkpoint(ORIGINAL).config
    fields = {k: v for k, v in config.to_dict().items() if k not in ("_class_name", "sample_size")}
    model = LuminaNextDiT2DModel(**fields).eval()
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    return model


def test_original_and_diffusers_layouts_of_the_same_weights_agree(tmp_path, original_model):
    reference = diffusers_from_original(tmp_path / "transformer")
    assert (
        relative_error(
            transformer_forward(reference, IO["a_x"], IO["a_t"], IO["a_cap"], IO["a_cap_mask"])[:, :4], IO["a_out"]
        )
        <= FLOAT32_BOUND
    )
    from_diffusers = load_transformer(tmp_path / "transformer", progress=False)
    np.testing.assert_allclose(run(from_diffusers, IO["a_x"]), run(original_model, IO["a_x"]), rtol=0, atol=1e-6)
    # a pipeline folder loads its transformer/
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "LuminaPipeline"}))
    assert find_checkpoint(tmp_path).path == tmp_path / "transformer"


def test_sharded_safetensors_with_index(tmp_path):
    reference = random_transformer(seed=3, **TINY_NEXT_DIT)
    reference.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (
        len(list(tmp_path.glob("*.safetensors"))) > 2
        and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    )
    x, t, caption, mask = inputs(0, 2, 8, 12, 6, 32, [6, 2])
    ours = load_transformer(tmp_path, progress=False)
    assert (
        relative_error(run(ours, x, t, caption, mask), transformer_forward(reference, x, t, caption, mask))
        <= FLOAT32_BOUND
    )
    # ...and a missing shard is named
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_transformer(tmp_path, progress=False)


def test_export_to_diffusers_round_trips(tmp_path, original_model):
    save_diffusers(original_model, tmp_path / "exported")
    reference = LuminaNextDiT2DModel.from_pretrained(tmp_path / "exported").eval()
    expected = transformer_forward(reference, IO["a_x"], IO["a_t"], IO["a_cap"], IO["a_cap_mask"])
    assert relative_error(run(original_model, IO["a_x"]), expected) <= FLOAT32_BOUND


def test_original_checkpoint_trained_with_ffn_dim_multiplier(tmp_path):
    """The FFN width int(1.3 * 256) rounded up to 32 = 352 matches no multiple_of alone: the loader
    infers a multiplier that reproduces it. diffusers' module, the same architecture as the original's,
    gives the weights (under the original's names) and the reference output; export writes it back."""
    constructor = json.loads((ORIGINAL / "constructor_args.json").read_text())["constructor"]
    reference = random_transformer(
        seed=5,
        hidden_size=96,
        num_layers=3,
        num_attention_heads=6,
        num_kv_heads=2,
        multiple_of=32,
        ffn_dim_multiplier=1.3,
        cross_attention_dim=48,
    )
    assert constructor["dim"] == 96 and reference.layers[0].feed_forward.linear_1.weight.shape[0] == 352
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    original_keys = load_file(ORIGINAL / "consolidated.00-of-01.safetensors")
    save_file(
        {key: state[original_key_to_diffusers(key)] for key in original_keys},
        str(tmp_path / "consolidated.00-of-01.safetensors"),
    )
    ours = load_transformer(tmp_path, progress=False)
    assert ours.config.ffn_dim == 352
    assert_computes_and_exports_as(ours, reference, inputs(1, 2, 8, 12, 6, 48, [6, 3]), tmp_path / "exported")


def assert_computes_and_exports_as(ours, reference, arrays, folder: Path) -> None:
    """Our model computes what diffusers' reference does, and so does diffusers' own load of its export."""
    expected = transformer_forward(reference, *arrays)
    assert relative_error(run(ours, *arrays), expected) <= FLOAT32_BOUND
    save_diffusers(ours, folder)
    exported = LuminaNextDiT2DModel.from_pretrained(folder).eval()
    assert relative_error(transformer_forward(exported, *arrays), expected) <= FLOAT32_BOUND


@pytest.mark.parametrize("differs", ["to_q", "norm_q"])
def test_a_separate_caption_query_computes_what_diffusers_computes(tmp_path, differs):
    """A model fine-tuned with diffusers, where attn2's query (projection or norm) is a parameter of its
    own: loaded with the caption branch's own query, at float32 parity, and exported back."""
    reference = random_transformer(seed=1, **TINY_NEXT_DIT)
    with torch.no_grad():
        getattr(reference.layers[1].attn2, differs).weight.mul_(1.5).add_(0.1)
    reference.save_pretrained(tmp_path / "fine-tuned")
    ours = load_transformer(tmp_path / "fine-tuned", progress=False)
    assert ours.config.separate_caption_query
    assert_computes_and_exports_as(ours, reference, inputs(2, 2, 8, 12, 6, 32, [6, 2]), tmp_path / "exported")
    assert load_transformer(tmp_path / "exported", progress=False).config.separate_caption_query


def test_finding_reads_no_tensor_and_the_caption_query_is_decided_once(tmp_path, monkeypatch):
    """Finding a diffusers checkpoint reads only its index; whether attn2 has a query of its own is decided
    on the first use of its config, reading each compared tensor once, and the load reads every tensor once."""
    reference = random_transformer(seed=1, **TINY_NEXT_DIT)
    with torch.no_grad():
        reference.layers[1].attn2.to_q.weight.mul_(1.5)
    reference.save_pretrained(tmp_path)
    loads = []
    read = SafetensorsTensor.load
    monkeypatch.setattr(SafetensorsTensor, "load", lambda tensor: loads.append(tensor) or read(tensor))

    checkpoint = find_checkpoint(tmp_path)
    assert loads == [] and not checkpoint.found_config.separate_caption_query
    assert checkpoint.config.separate_caption_query
    key_of = {id(tensor): key for key, tensor in checkpoint.tensors.items()}
    compared = [key_of[id(tensor)] for tensor in loads]
    assert len(compared) == len(set(compared)) and compared  # each read once, until the first difference
    assert {key.split(".", 3)[3] for key in compared} <= {"to_q.weight", "norm_q.weight", "norm_q.bias"}
    assert checkpoint.config.separate_caption_query and len(loads) == len(compared)  # decided once
    loads.clear()
    build_model(checkpoint, progress=False)
    assert sorted(key_of[id(tensor)] for tensor in loads) == sorted(checkpoint.tensors)


def test_released_layout_keeps_one_shared_query(tmp_path):
    random_transformer(
        seed=1,
        hidden_size=64,
        num_layers=1,
        num_attention_heads=4,
        num_kv_heads=4,
        multiple_of=16,
        cross_attention_dim=32,
    ).save_pretrained(tmp_path)
    ours = load_transformer(tmp_path, progress=False)
    assert not ours.config.separate_caption_query and ours.layers.attention.to_q_caption is None


# --- refusals -------------------------------------------------------------------------------


def test_truncated_safetensors_names_the_file(tmp_path):
    shutil.copy(ORIGINAL / "model_args.pth", tmp_path)
    data = (ORIGINAL / "consolidated.00-of-01.safetensors").read_bytes()
    (tmp_path / "consolidated.00-of-01.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"consolidated.00-of-01.safetensors: truncated"):
        load_transformer(tmp_path, progress=False)


def test_corrupt_safetensors_header(tmp_path):
    (tmp_path / "consolidated.00-of-01.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_transformer(tmp_path, progress=False)


def test_a_folder_without_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no Next-DiT, Flag-DiT or Unified Next-DiT weights found"):
        load_transformer(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_transformer(tmp_path / "missing", progress=False)


def test_a_checkpoint_of_another_model(tmp_path):
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, tmp_path / "consolidated.00-of-01.safetensors")
    with pytest.raises(ValueError, match="not a Next-DiT, Flag-DiT or Unified Next-DiT checkpoint"):
        load_transformer(tmp_path, progress=False)


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pth_that_carries_code_is_refused(tmp_path):
    torch.save({"x_embedder.weight": torch.zeros(2, 2), "hook": RunsCode()}, tmp_path / "consolidated.00-of-01.pth")
    with pytest.raises(UnsafeCheckpointError, match="print"):
        load_transformer(tmp_path, progress=False)


def test_unknown_config_field(tmp_path):
    random_transformer(
        seed=0,
        hidden_size=64,
        num_layers=1,
        num_attention_heads=4,
        num_kv_heads=4,
        multiple_of=16,
        cross_attention_dim=32,
    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_experts": 8}))
    with pytest.raises(
        ValueError,
        match=r"config.json: not a supported Next-DiT, Flag-DiT or Unified Next-DiT config: "
        r"unknown Next-DiT config fields \['num_e",
    ):
        load_transformer(tmp_path, progress=False)


def test_model_parallel_shards_are_refused_with_the_reason(tmp_path):
    for rank in range(2):
        shutil.copy(
            ORIGINAL / "consolidated.00-of-01.safetensors", tmp_path / f"consolidated.0{rank}-of-02.safetensors"
        )
    with pytest.raises(
        ValueError,
        match=r"consolidated.00-of-02.safetensors, consolidated.01-of-02.safetensors are "
        "model-parallel shards.*each shard normalises its own heads",
    ):
        load_transformer(tmp_path)

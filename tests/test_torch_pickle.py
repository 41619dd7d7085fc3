"""The torch-free .pth reader against torch.save / torch.load, the fixture and hostile files."""

import argparse
import builtins
import collections
import os
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from lumina_jax.weights.torch_pickle import LazyTensor, UnsafeCheckpointError, load_pth

FIXTURES = Path(__file__).parent / "fixtures" / "lumina_next_original_tiny"

NP_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    torch.uint16: np.uint16,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
}


def assert_same(ours, ref):
    """Same structure, and every tensor bit-identical (so bf16, float8, NaN and -0.0 count)."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, LazyTensor)
        assert ours.shape == tuple(ref.shape) and ours.dtype == NP_DTYPES[ref.dtype]
        got = ours.load()
        assert got.shape == ours.shape and got.dtype == ours.dtype and got.flags.c_contiguous
        assert got.tobytes() == ref.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    elif isinstance(ref, (dict, list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        if isinstance(ref, dict):
            assert list(ours) == list(ref)
            ours, ref = ours.values(), ref.values()
        for o, r in zip(ours, ref):
            assert_same(o, r)
    elif isinstance(ref, argparse.Namespace):
        assert type(ours) is argparse.Namespace
        assert_same(vars(ours), vars(ref))
    else:
        assert type(ours) is type(ref) and ours == ref


def saved(tmp_path, obj, name="ckpt.pth", **kwargs):
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def rezip(src, dst, edit):
    """Copy a zip member by member; ``edit(name, data)`` returns new bytes, or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return dst


def test_round_trip_matches_torch_load(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    shared = torch.arange(20, dtype=torch.int64)
    obj = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(4).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(2, dtype=torch.float64),
        "i64": torch.tensor([-(2**40), 7]),
        "i32": torch.tensor([1, -2], dtype=torch.int32),
        "i16": torch.tensor([-3], dtype=torch.int16),
        "i8": torch.tensor([-4], dtype=torch.int8),
        "u8": torch.tensor([250], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "u16": torch.tensor([65535, 1], dtype=torch.uint16),  # UntypedStorage + rebuild_v3
        "f8": torch.randn(5).to(torch.float8_e4m3fn),
        "param": torch.nn.Parameter(torch.randn(3, 2)),
        "special": torch.tensor([float("nan"), -0.0, float("inf")]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),  # non-contiguous
        "sliced": base[2:5, 1::3],  # storage offset and strides
        "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
        "shared_a": shared[:10],  # two tensors on one storage
        "shared_b": shared[5:].view(3, 5),
        "nested": {
            "list": [torch.ones(2), 3, "x"],
            "tuple": (torch.zeros(1), None),
            "od": collections.OrderedDict(w=torch.randn(2, 2), b=torch.randn(2)),
        },
        "args": argparse.Namespace(model="NextDiT_2B", image_size=1024, lr=1e-4, qk_norm=True),
    }
    path = saved(tmp_path, obj)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ref = torch.load(path, weights_only=True)
    ours = load_pth(path)
    assert_same(ours, ref)
    assert ours["shared_a"].storage is ours["shared_b"].storage


def test_load_pth_reads_no_tensor_data_and_load_reads_only_its_own(tmp_path):
    a, b = torch.arange(1000, dtype=torch.float32), torch.full((10,), 7.0)
    path = saved(tmp_path, {"a": a, "b": b})
    lazy = load_pth(path)
    # Overwrite a's bytes after load_pth: load() must see the new bytes, b must be untouched.
    raw = path.read_bytes()
    start = raw.index(a.numpy().tobytes())
    patched = -a.numpy()
    path.write_bytes(raw[:start] + patched.tobytes() + raw[start + patched.nbytes :])
    np.testing.assert_array_equal(lazy["a"].load(), patched)
    np.testing.assert_array_equal(lazy["b"].load(), b.numpy())


def test_file_without_byteorder_record(tmp_path):
    path = saved(tmp_path, {"w": torch.randn(3)}, _disable_byteorder_record=True)
    assert_same(load_pth(path), torch.load(path, weights_only=True))


def test_lumina_fixture_matches_safetensors():
    ours = load_pth(FIXTURES / "consolidated.00-of-01.pth")
    ref = load_file(FIXTURES / "consolidated.00-of-01.safetensors")
    assert isinstance(ours, collections.OrderedDict) and sorted(ours) == sorted(ref)
    for key, want in ref.items():
        got = ours[key].load()
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key

    args = load_pth(FIXTURES / "model_args.pth")
    assert type(args) is argparse.Namespace
    assert args.model == "NextDiT_tiny_fixture" and args.image_size == 256


class SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalCall(SystemCall):
    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize(
    "payload, global_name",
    [
        (SystemCall, rf"'{os.system.__module__}\.system'"),
        (EvalCall, r"'__builtin__\.eval'"),  # torch.save's pickle protocol 2 writes Python 2 names
    ],
)
def test_malicious_pickle_is_refused(tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    path = saved(tmp_path, {"w": torch.ones(2), "evil": payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match=global_name) as err:
        load_pth(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


class Overrun:
    """A tensor whose view reaches past its 2-element storage, as a hostile file could claim."""

    def __reduce__(self):
        storage = torch.ones(2)._typed_storage()
        return torch._utils._rebuild_tensor_v2, (storage, 1, (4,), (1,), False, {})


def test_view_past_its_storage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="overruns member ckpt/data/0"):
        load_pth(saved(tmp_path, {"w": Overrun()}))


def test_truncated_and_random_files(tmp_path):
    raw = saved(tmp_path, {"w": torch.randn(100)}).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(raw[: len(raw) // 2])
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    for path, what in [(truncated, "truncated"), (noise, "not a PyTorch zip checkpoint")]:
        with pytest.raises(ValueError, match=what) as err:
            load_pth(path)
        assert str(path) in str(err.value)


def test_short_member_is_reported(tmp_path):
    path = saved(tmp_path, {"w": torch.randn(96)})  # data/0 holds 384 bytes
    bad = rezip(path, tmp_path / "short.pth", lambda name, data: data[:100] if name.endswith("data/0") else data)
    with pytest.raises(ValueError, match="truncated: member ckpt/data/0 has 100 of 384 bytes"):
        load_pth(bad)


def test_file_cut_after_load_pth(tmp_path):
    w = torch.randn(96)
    path = saved(tmp_path, {"w": w})
    lazy = load_pth(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(w.numpy().tobytes()) + 100])
    with pytest.raises(ValueError, match=f"{path}: truncated: member ckpt/data/0 has 100 of 384"):
        lazy["w"].load()


def test_compressed_member_is_refused(tmp_path):
    path = saved(tmp_path, {"w": torch.zeros(96)})
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(ValueError, match="compressed"):
        load_pth(tmp_path / "deflated.pth")


def test_big_endian_is_refused(tmp_path):
    path = saved(tmp_path, {"w": torch.randn(3)})
    bad = rezip(path, tmp_path / "big.pth", lambda name, data: b"big" if name.endswith("/byteorder") else data)
    with pytest.raises(ValueError, match="only little-endian"):
        load_pth(bad)


def test_legacy_format_is_refused(tmp_path):
    path = saved(tmp_path, {"w": torch.randn(3)}, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy .* not supported"):
        load_pth(path)

"""The native boundary: what the core sees for each kind of input, and every rejection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_rt._native import _C
from tests.dlpack_fakes import FakeDeviceTensor

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_torch_cpu_view_matches_tensor(dtype: torch.dtype) -> None:
    t = torch.randn(5, 7).to(dtype)
    v = _C.inspect_tensor(t)
    assert v["data_ptr"] == t.data_ptr()
    assert v["numel"] == 35 and v["nbytes"] == 35 * t.element_size()
    assert v["dtype"] == str(dtype).removeprefix("torch.")
    assert v["device"] == "cpu" and v["stream"] == 0 and v["shape"] == (5, 7)
    assert v["read_only"] is False


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_view_matches_array(dtype: type) -> None:
    a = np.arange(12, dtype=dtype).reshape(3, 4)
    v = _C.inspect_tensor(a)
    assert v["data_ptr"] == a.ctypes.data and v["numel"] == 12 and v["dtype"] == np.dtype(dtype).name


def test_offset_views_point_at_their_first_element() -> None:
    base = torch.arange(10, dtype=torch.float32)
    sub = base[3:8]
    assert _C.inspect_tensor(sub)["data_ptr"] == base.data_ptr() + 3 * 4
    row = torch.zeros(4, 6)[2]
    assert _C.inspect_tensor(row)["numel"] == 6


def test_empty_and_scalar_tensors() -> None:
    assert _C.inspect_tensor(torch.empty(0))["numel"] == 0
    assert _C.inspect_tensor(torch.empty(3, 0, 2))["numel"] == 0
    assert _C.inspect_tensor(torch.tensor(2.5))["numel"] == 1
    # A size-1 dimension may have any stride and is still contiguous.
    assert _C.inspect_tensor(torch.zeros(4, 1).t())["numel"] == 4


def test_index_dtypes_only_where_asked() -> None:
    idx = torch.arange(5, dtype=torch.int32)
    assert _C.inspect_tensor(idx, dtypes=["int32", "int64"])["dtype"] == "int32"
    with pytest.raises(TypeError, match=r"indices: expected dtype int32 or int64, got float32"):
        _C.inspect_tensor(torch.zeros(3), name="indices", dtypes=["int32", "int64"])


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: torch.zeros(4, 6)[:, ::2], "grad: expected a contiguous tensor"),
        (lambda: torch.zeros(4, 6).t(), "grad: expected a contiguous tensor"),
        (lambda: np.zeros((4, 6), np.float32)[::2], "grad: expected a contiguous tensor"),
        (lambda: torch.zeros(3, dtype=torch.float64), "grad: expected dtype float32, float16 or bfloat16, got float64"),
        (lambda: torch.zeros(3, dtype=torch.int64), "grad: expected dtype float32, float16 or bfloat16, got int64"),
        (lambda: torch.zeros(3, dtype=torch.bool), "grad: expected dtype .* got bool8"),
        (lambda: torch.zeros(3, dtype=torch.complex64), "grad: expected dtype .* got complex64"),
        (lambda: [1.0, 2.0], "grad: expected a tensor or array that supports DLPack .* got list"),
        (lambda: None, "grad: expected a tensor or array that supports DLPack .* got NoneType"),
        (lambda: FakeDeviceTensor(4, device_type=7), "grad: expected a CPU or CUDA tensor"),
    ],
)
def test_bad_input_is_a_type_error_naming_the_argument(make, pattern: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=pattern):
        _C.inspect_tensor(make(), name="grad")


def test_read_only_array_is_readable_but_not_writable() -> None:
    a = np.ones(8, np.float32)
    a.flags.writeable = False
    assert _C.inspect_tensor(a)["read_only"] is True
    with pytest.raises(ValueError, match="residual: is read-only but this operation writes to it"):
        _C.inspect_tensor(a, name="residual", writable=True)
    assert a.sum() == 8  # nothing lost


def test_producer_refusal_is_reported_with_its_reason() -> None:
    t = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"w: the producer refused to export it through DLPack: .*detach"):
        _C.inspect_tensor(t, name="w")


def test_list_of_tensors_names_the_bad_element() -> None:
    good = [torch.zeros(2), torch.ones(3, dtype=torch.float16)]
    views = _C.inspect_tensor_list(good)
    assert [v["numel"] for v in views] == [2, 3]
    with pytest.raises(TypeError, match=r"tensors\[2\]: expected a contiguous tensor"):
        _C.inspect_tensor_list([*good, torch.zeros(4, 4).t()])
    with pytest.raises(TypeError, match="tensors: expected a list or tuple of tensors, got Tensor"):
        _C.inspect_tensor_list(torch.zeros(3))
    assert _C.inspect_tensor_list([]) == []


def test_mixed_devices_are_rejected() -> None:
    fake_cuda = FakeDeviceTensor(4, device_type=2, device_id=0)
    with pytest.raises(ValueError, match=r"tensors\[1\]: expected a tensor on cpu like tensors\[0\], got .* cuda:0"):
        _C.inspect_tensor_list([torch.zeros(2), fake_cuda])
    with pytest.raises(ValueError, match=r"tensors\[1\]: expected a tensor on cuda:0 .* got one on cuda:1"):
        _C.inspect_tensor_list([fake_cuda, FakeDeviceTensor(4, device_id=1)])


def test_cuda_stream_is_passed_to_the_producer() -> None:
    fake = FakeDeviceTensor(16, device_type=2, device_id=1)
    v = _C.inspect_tensor(fake, stream=0xABC0)
    assert fake.received_stream == 0xABC0
    assert v["device"] == "cuda:1" and v["stream"] == 0xABC0 and v["numel"] == 16
    # The legacy default stream is 1 in DLPack (0 is reserved).
    _C.inspect_tensor(fake)
    assert fake.received_stream == 1

    class StreamLike:
        cuda_stream = 0x1234

    assert _C.inspect_tensor(fake, stream=StreamLike())["stream"] == 0x1234
    with pytest.raises(TypeError, match="stream: expected None, an int"):
        _C.inspect_tensor(fake, stream="default")


def test_cpu_tensor_ignores_stream_argument() -> None:
    assert _C.inspect_tensor(torch.zeros(2), stream=77)["stream"] == 0


@pytest.mark.cuda
def test_torch_cuda_tensor_view() -> None:
    t = torch.randn(1000, device="cuda")
    s = torch.cuda.current_stream()
    v = _C.inspect_tensor(t, stream=s.cuda_stream)
    assert v["device"] == f"cuda:{t.device.index}" and v["data_ptr"] == t.data_ptr()
    with pytest.raises(ValueError, match="expected a tensor on cpu"):
        _C.inspect_tensor_list([torch.zeros(2), t])


def test_bandwidth_probes_read_and_copy_real_memory() -> None:
    src = np.random.default_rng(0).integers(0, 2**31, size=1 << 20, dtype=np.int64)
    dst = np.zeros_like(src)
    _C.parallel_copy(dst, src)
    np.testing.assert_array_equal(dst, src)
    assert _C.read_checksum(src) == int(src.view(np.uint64).sum(dtype=np.uint64))  # wraps mod 2**64
    odd = np.arange(1001, dtype=np.float16)  # 2002 bytes: 250 words and 2 trailing bytes
    raw = odd.view(np.uint8)
    expected = int(raw[:2000].view(np.uint64).sum(dtype=np.uint64)) + int(raw[2000:].sum())
    assert _C.read_checksum(odd) == expected % 2**64
    assert _C.read_checksum(src) == _C.read_checksum(dst)
    dst[12345] += 1
    assert _C.read_checksum(src) != _C.read_checksum(dst)
    with pytest.raises(ValueError, match="dst has 8 bytes, src has 16"):
        _C.parallel_copy(np.zeros(1, np.int64), np.zeros(2, np.int64))

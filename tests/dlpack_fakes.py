"""A DLPack producer built with ctypes, for boundary tests that need a device this machine lacks
(a CUDA tensor on a CPU-only machine, an unsupported device type). The memory it points to is
never touched by the boundary; it records the stream the consumer asked for."""

from __future__ import annotations

import ctypes
from typing import Any


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeDeviceTensor:
    """A 1-D float32 tensor of ``n`` elements that claims to live on ``device_type:device_id``
    (DLPack codes: 1 CPU, 2 CUDA, 7 Vulkan...)."""

    def __init__(self, n: int, device_type: int = 2, device_id: int = 0, data_ptr: int = 0x10000) -> None:
        self.device_type, self.device_id = device_type, device_id
        self.received_stream: Any = "not called"
        self._shape = (ctypes.c_int64 * 1)(n)
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data = data_ptr
        t.device = _DLDevice(device_type, device_id)
        t.ndim = 1
        t.dtype = _DLDataType(2, 32, 1)
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device_type, self.device_id)

    def __dlpack__(self, *, stream: Any = None) -> Any:  # legacy protocol: no max_version
        self.received_stream = stream
        return _PyCapsule_New(ctypes.addressof(self._managed), b"dltensor", None)

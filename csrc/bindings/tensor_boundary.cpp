#include "bindings/tensor_boundary.h"

#include <cstring>

#include "autoglm_rt/error.h"
#include "bindings/dlpack_abi.h"

namespace py = pybind11;

namespace agrt::bindings {
namespace {

constexpr const char* kVersionedName = "dltensor_versioned";
constexpr const char* kLegacyName = "dltensor";

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__qualname__")); }

std::optional<DType> to_dtype(const dlpack::DLDataType& t) {
  if (t.lanes != 1) return std::nullopt;
  if (t.code == dlpack::kDLFloat && t.bits == 32) return DType::kFloat32;
  if (t.code == dlpack::kDLFloat && t.bits == 16) return DType::kFloat16;
  if (t.code == dlpack::kDLBfloat && t.bits == 16) return DType::kBFloat16;
  if (t.code == dlpack::kDLInt && t.bits == 32) return DType::kInt32;
  if (t.code == dlpack::kDLInt && t.bits == 64) return DType::kInt64;
  if (t.code == dlpack::kDLUInt && t.bits == 8) return DType::kUInt8;
  return std::nullopt;
}

std::string describe_dtype(const dlpack::DLDataType& t) {
  static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  std::string s = t.code < 7 ? codes[t.code] : "code" + std::to_string(t.code);
  s += std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

// "BufferError: message", without the traceback pybind11 appends to what().
std::string error_text(const py::error_already_set& e) {
  return std::string(py::str(e.type().attr("__name__"))) + ": " + std::string(py::str(e.value()));
}

// Calls obj.__dlpack__ asking for a versioned capsule (read-only flag) and falls back to the
// legacy protocol for producers that do not know max_version.
py::object export_capsule(py::handle obj, const std::string& arg, py::object stream_arg) {
  try {
    return obj.attr("__dlpack__")(py::arg("stream") = stream_arg,
                                  py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) {
      throw ValueError(arg + ": the producer refused to export it through DLPack: " + error_text(e));
    }
  }
  try {
    return obj.attr("__dlpack__")(py::arg("stream") = stream_arg);
  } catch (py::error_already_set& e) {
    throw ValueError(arg + ": the producer refused to export it through DLPack: " + error_text(e));
  }
}

// torch's DLPack export costs ~10 us per tensor (__dlpack__ plus a Python-level
// __dlpack_device__), which would dominate grad_stats for thousands of small gradients (measured:
// 0.2 s for 10,000 tensors against 0.04 s for torch._foreach_norm). For plain torch tensors the
// same facts come from a handful of cheap attribute reads; the checks are those of borrow_tensor.
// Anything else (numpy, cupy, tensor subclasses) goes through the DLPack boundary.
struct TorchTypes {
  py::object tensor_type, parameter_type, strided, f32, f16, bf16;
};

const TorchTypes* torch_types() {
  static const TorchTypes* types = [] () -> const TorchTypes* {
    py::object modules = py::module_::import("sys").attr("modules");
    if (!modules.contains("torch")) return nullptr;
    py::object torch = modules["torch"];
    return new TorchTypes{torch.attr("Tensor"), torch.attr("nn").attr("Parameter"), torch.attr("strided"),
                          torch.attr("float32"),  torch.attr("float16"),           torch.attr("bfloat16")};
  }();
  return types;
}

std::string torch_dtype_name(py::handle dtype) {
  std::string s = py::str(dtype);
  return s.rfind("torch.", 0) == 0 ? s.substr(6) : s;
}

// A new reference from obj.name or obj.name(); throws the pending Python error on failure.
py::object get(py::handle obj, const py::str& name) {
  PyObject* r = PyObject_GetAttr(obj.ptr(), name.ptr());
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}
py::object call(py::handle obj, const py::str& name) {
  PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), name.ptr());
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

}  // namespace

std::string DTypeSet::describe() const {
  std::vector<std::string> names;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt32, DType::kInt64, DType::kUInt8}) {
    if (contains(t)) names.emplace_back(dtype_name(t));
  }
  std::string s;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) s += (i + 1 == names.size()) ? " or " : ", ";
    s += names[i];
  }
  return s;
}

std::optional<std::uintptr_t> parse_stream(py::handle stream) {
  if (stream.is_none()) return std::nullopt;
  if (py::isinstance<py::int_>(stream)) return stream.cast<std::uintptr_t>();
  for (const char* attr : {"cuda_stream", "ptr"}) {
    if (py::hasattr(stream, attr)) return stream.attr(attr).cast<std::uintptr_t>();
  }
  throw TypeError("stream: expected None, an int (cudaStream_t) or an object with .cuda_stream, got " +
                  type_name(stream));
}

namespace {

// The DLPack export shared by borrow_tensor and borrow_rows: checks the protocol, the device and
// the dtype, and fills everything of `out` but the layout-dependent numel. Returns the DLTensor
// (alive while out.keepalive is) and whether the producer marked it read-only.
std::pair<const dlpack::DLTensor*, bool> export_tensor(py::handle obj, const std::string& arg, DTypeSet allowed,
                                                       std::optional<std::uintptr_t> stream, BorrowedTensor& out) {
  if (!py::hasattr(obj, "__dlpack__") || !py::hasattr(obj, "__dlpack_device__")) {
    throw TypeError(arg + ": expected a tensor or array that supports DLPack (torch.Tensor, "
                          "numpy.ndarray, cupy.ndarray), got " + type_name(obj));
  }
  const auto dev = obj.attr("__dlpack_device__")().cast<std::pair<int, int>>();
  py::object stream_arg = py::none();
  if (dev.first == dlpack::kDLCUDA) {
    // DLPack reserves 0; legacy default stream is 1.
    const std::uintptr_t s = stream.value_or(0);
    stream_arg = py::int_(s == 0 ? std::uintptr_t{1} : s);
  } else if (dev.first != dlpack::kDLCPU) {
    throw TypeError(arg + ": expected a CPU or CUDA tensor, got DLPack device type " +
                    std::to_string(dev.first));
  }

  out.keepalive = export_capsule(obj, arg, stream_arg);
  PyObject* cap = out.keepalive.ptr();
  const dlpack::DLTensor* t = nullptr;
  bool read_only = false;
  if (PyCapsule_IsValid(cap, kVersionedName)) {
    auto* m = static_cast<dlpack::DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, kVersionedName));
    t = &m->dl_tensor;
    read_only = (m->flags & dlpack::kFlagReadOnly) != 0;
  } else if (PyCapsule_IsValid(cap, kLegacyName)) {
    t = &static_cast<dlpack::DLManagedTensor*>(PyCapsule_GetPointer(cap, kLegacyName))->dl_tensor;
  } else {
    throw TypeError(arg + ": __dlpack__ returned something that is not a DLPack capsule");
  }

  const auto dtype = to_dtype(t->dtype);
  if (!dtype || !allowed.contains(*dtype)) {
    throw TypeError(arg + ": expected dtype " + allowed.describe() + ", got " +
                    (dtype ? std::string(dtype_name(*dtype)) : describe_dtype(t->dtype)));
  }
  out.shape.assign(t->shape, t->shape + t->ndim);
  TensorView& v = out.view;
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  v.dtype = *dtype;
  v.read_only = read_only;
  if (t->device.device_type == dlpack::kDLCUDA) {
    v.device = Device{DeviceType::kCUDA, t->device.device_id};
    v.stream = stream.value_or(0);
  }
  return {t, read_only};
}

void require_writable(const std::string& arg, Access access, bool read_only) {
  if (access == Access::kWrite && read_only) {
    throw ValueError(arg + ": is read-only but this operation writes to it; pass a writable copy");
  }
}

}  // namespace

BorrowedTensor borrow_tensor(py::handle obj, const std::string& arg, Access access, DTypeSet allowed,
                             std::optional<std::uintptr_t> stream) {
  BorrowedTensor out;
  const auto [t, read_only] = export_tensor(obj, arg, allowed, stream, out);
  std::int64_t numel = 1;
  for (auto s : out.shape) numel *= s;
  if (t->strides != nullptr && numel > 1) {
    std::int64_t expected = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
      if (t->shape[d] != 1 && t->strides[d] != expected) {
        throw TypeError(arg + ": expected a contiguous tensor (row-major, no gaps); call "
                              ".contiguous() or numpy.ascontiguousarray() first");
      }
      expected *= t->shape[d];
    }
  }
  require_writable(arg, access, read_only);
  out.view.numel = numel;
  return out;
}

BorrowedRows borrow_rows(py::handle obj, const std::string& arg, Access access, DTypeSet allowed,
                         std::optional<std::uintptr_t> stream) {
  BorrowedRows out;
  const auto [t, read_only] = export_tensor(obj, arg, allowed, stream, out.tensor);
  if (t->ndim != 1 && t->ndim != 2) {
    throw ValueError(arg + ": expected a 1-D tensor (one row) or a 2-D tensor of rows, got " +
                     std::to_string(t->ndim) + " dimensions");
  }
  out.rows = t->ndim == 2 ? t->shape[0] : 1;
  out.row_len = t->shape[t->ndim - 1];
  out.row_stride = out.row_len;
  if (t->strides != nullptr) {
    if (out.row_len > 1 && t->strides[t->ndim - 1] != 1) {
      throw TypeError(arg + ": expected each row contiguous (inner stride 1), got inner stride " +
                      std::to_string(t->strides[t->ndim - 1]) + "; call .contiguous() first");
    }
    if (t->ndim == 2 && out.rows > 1) out.row_stride = t->strides[0];
  }
  if (out.rows > 1 && out.row_stride < out.row_len) {
    throw TypeError(arg + ": expected rows that do not overlap (row stride >= row length " +
                    std::to_string(out.row_len) + "), got row stride " + std::to_string(out.row_stride));
  }
  require_writable(arg, access, read_only);
  out.tensor.view.numel = out.rows * out.row_len == 0 ? 0 : (out.rows - 1) * out.row_stride + out.row_len;
  return out;
}

std::vector<BorrowedTensor> borrow_tensor_list(py::handle seq, const std::string& arg, Access access,
                                               DTypeSet allowed, std::optional<std::uintptr_t> stream) {
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq) || py::hasattr(seq, "__dlpack__")) {
    throw TypeError(arg + ": expected a list or tuple of tensors, got " + type_name(seq));
  }
  auto items = py::reinterpret_borrow<py::sequence>(seq);
  std::vector<BorrowedTensor> out;
  out.reserve(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string name = arg + "[" + std::to_string(i) + "]";
    out.push_back(borrow_tensor(items[i], name, access, allowed, stream));
    if (i > 0) require_same_device(out[0], arg + "[0]", out.back(), name);
  }
  return out;
}

std::vector<TensorView> borrow_floating_views(py::handle seq, const std::string& arg, Access access,
                                              std::optional<std::uintptr_t> stream,
                                              std::vector<BorrowedTensor>& keep) {
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq) || py::hasattr(seq, "__dlpack__")) {
    throw TypeError(arg + ": expected a list or tuple of tensors, got " + type_name(seq));
  }
  auto items = py::reinterpret_borrow<py::sequence>(seq);
  std::vector<TensorView> views(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string name = arg + "[" + std::to_string(i) + "]";
    py::object item = items[i];
    if (!view_torch_tensor(item, name, stream, views[i])) {
      keep.push_back(borrow_tensor(item, name, access, kFloatingTypes, stream));
      views[i] = keep.back().view;
    }
    if (i > 0 && views[i].device != views[0].device) {
      throw ValueError(name + ": expected a tensor on " + views[0].device.str() + " like " + arg + "[0], got one on " +
                       views[i].device.str());
    }
  }
  return views;
}

void require_same_device(const BorrowedTensor& a, const std::string& a_name, const BorrowedTensor& b,
                         const std::string& b_name) {
  if (a.view.device != b.view.device) {
    throw ValueError(b_name + ": expected a tensor on " + a.view.device.str() + " like " + a_name +
                     ", got one on " + b.view.device.str());
  }
}

// Fills `v` from a torch tensor; false when `obj` is not a plain torch.Tensor/Parameter.
bool view_torch_tensor(py::handle obj, const std::string& name, std::optional<std::uintptr_t> stream, TensorView& v) {
  const TorchTypes* tt = torch_types();
  if (tt == nullptr) return false;
  const PyTypeObject* type = Py_TYPE(obj.ptr());
  if (type != reinterpret_cast<PyTypeObject*>(tt->tensor_type.ptr()) &&
      type != reinterpret_cast<PyTypeObject*>(tt->parameter_type.ptr())) {
    return false;
  }
  static const py::str s_dtype("dtype"), s_layout("layout"), s_is_contiguous("is_contiguous"),
      s_get_device("get_device"), s_is_cpu("is_cpu"), s_is_cuda("is_cuda"), s_device("device"),
      s_data_ptr("data_ptr"), s_numel("numel");
  const py::object dtype = get(obj, s_dtype);
  if (dtype.is(tt->f32)) {
    v.dtype = DType::kFloat32;
  } else if (dtype.is(tt->f16)) {
    v.dtype = DType::kFloat16;
  } else if (dtype.is(tt->bf16)) {
    v.dtype = DType::kBFloat16;
  } else {
    throw TypeError(name + ": expected dtype " + bindings::kFloatingTypes.describe() + ", got " +
                          torch_dtype_name(dtype));
  }
  // Non-strided layouts (sparse, mkldnn) answer is_contiguous() in every way, or raise.
  if (!get(obj, s_layout).is(tt->strided)) {
    throw TypeError(name + ": expected a dense (strided) tensor, got layout " +
                          std::string(py::str(get(obj, s_layout))));
  }
  if (!PyObject_IsTrue(call(obj, s_is_contiguous).ptr())) {
    throw TypeError(name + ": expected a contiguous tensor (row-major, no gaps); call .contiguous() first");
  }
  auto wrong_device = [&] {
    return TypeError(name + ": expected a CPU or CUDA tensor, got one on " +
                           std::string(py::str(get(obj, s_device))));
  };
  const long index = PyLong_AsLong(call(obj, s_get_device).ptr());
  if (index < 0) {
    v.device = Device{};
    v.stream = 0;
  } else {
    if (!PyObject_IsTrue(get(obj, s_is_cuda).ptr())) throw wrong_device();
    v.device = Device{DeviceType::kCUDA, static_cast<int>(index)};
    v.stream = stream.value_or(0);
  }
  v.data = PyLong_AsVoidPtr(call(obj, s_data_ptr).ptr());
  v.numel = PyLong_AsLongLong(call(obj, s_numel).ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  // get_device() is -1 for the CPU but also for devices without an index (meta): those have no
  // data pointer, and only then is it worth asking.
  if (index < 0 && v.data == nullptr && v.numel > 0 && !PyObject_IsTrue(get(obj, s_is_cpu).ptr())) throw wrong_device();
  v.read_only = false;
  return true;
}

}  // namespace agrt::bindings

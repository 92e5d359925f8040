// Bindings of the fused gradient statistics (autoglm_rt.ops.grad_stats is the public API).
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/grad_stats.h"
#include "bindings/registry.h"
#include "bindings/tensor_boundary.h"

namespace py = pybind11;
using agrt::bindings::Access;

namespace {

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

// Fills `v` from a torch tensor; false when `obj` is not a plain torch.Tensor/Parameter.
bool view_of_torch_tensor(py::handle obj, const std::string& name, std::optional<std::uintptr_t> stream,
                          agrt::TensorView& v) {
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
    v.dtype = agrt::DType::kFloat32;
  } else if (dtype.is(tt->f16)) {
    v.dtype = agrt::DType::kFloat16;
  } else if (dtype.is(tt->bf16)) {
    v.dtype = agrt::DType::kBFloat16;
  } else {
    throw agrt::TypeError(name + ": expected dtype " + agrt::bindings::kFloatingTypes.describe() + ", got " +
                          torch_dtype_name(dtype));
  }
  if (!get(obj, s_layout).is(tt->strided)) {
    throw agrt::TypeError(name + ": expected a dense (strided) tensor, got layout " +
                          std::string(py::str(get(obj, s_layout))));
  }
  if (!PyObject_IsTrue(call(obj, s_is_contiguous).ptr())) {
    throw agrt::TypeError(name + ": expected a contiguous tensor (row-major, no gaps); call .contiguous() first");
  }
  const long index = PyLong_AsLong(call(obj, s_get_device).ptr());
  const bool ok_device = index < 0 ? PyObject_IsTrue(get(obj, s_is_cpu).ptr()) : PyObject_IsTrue(get(obj, s_is_cuda).ptr());
  if (!ok_device) {
    throw agrt::TypeError(name + ": expected a CPU or CUDA tensor, got one on " + std::string(py::str(get(obj, s_device))));
  }
  if (index < 0) {
    v.device = agrt::Device{};
    v.stream = 0;
  } else {
    v.device = agrt::Device{agrt::DeviceType::kCUDA, static_cast<int>(index)};
    v.stream = stream.value_or(0);
  }
  v.data = PyLong_AsVoidPtr(call(obj, s_data_ptr).ptr());
  v.numel = PyLong_AsLongLong(call(obj, s_numel).ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  v.read_only = false;
  return true;
}

// The tensors of a grad_stats call: torch tensors through the fast path, others through DLPack
// (their keep-alive capsules are stored in `borrowed`). All must be on one device.
std::vector<agrt::TensorView> borrow_inputs(py::handle seq, std::optional<std::uintptr_t> stream,
                                            std::vector<agrt::bindings::BorrowedTensor>& borrowed) {
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq) || py::hasattr(seq, "__dlpack__")) {
    throw agrt::TypeError("tensors: expected a list or tuple of tensors, got " +
                          std::string(py::str(py::type::handle_of(seq).attr("__qualname__"))));
  }
  auto items = py::reinterpret_borrow<py::sequence>(seq);
  std::vector<agrt::TensorView> views(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    py::object item = items[i];
    if (!view_of_torch_tensor(item, name, stream, views[i])) {
      borrowed.push_back(agrt::bindings::borrow_tensor(item, name, Access::kRead, agrt::bindings::kFloatingTypes, stream));
      views[i] = borrowed.back().view;
    }
    if (i > 0 && views[i].device != views[0].device) {
      throw agrt::ValueError(name + ": expected a tensor on " + views[0].device.str() + " like tensors[0], got one on " +
                             views[i].device.str());
    }
  }
  return views;
}

}  // namespace

AGRT_BINDINGS(grad_stats) {
  m.def("grad_stats_fields", [] { return agrt::kernels::kGradStatsFields; },
        "Number of float64 columns per row of grad_stats' output.");
  m.def(
      "grad_stats_workspace_bytes",
      [](py::handle tensors) {
        std::vector<agrt::bindings::BorrowedTensor> keep;
        return agrt::kernels::grad_stats_workspace_bytes(borrow_inputs(tensors, std::nullopt, keep));
      },
      py::arg("tensors"), "Bytes of device workspace grad_stats needs (0 for CPU tensors).");
  m.def(
      "grad_stats",
      [](py::handle tensors, py::handle out, py::handle workspace, py::handle stream) {
        const auto s = agrt::bindings::parse_stream(stream);
        std::vector<agrt::bindings::BorrowedTensor> keep;
        auto views = borrow_inputs(tensors, s, keep);
        auto o = agrt::bindings::borrow_tensor(out, "out", Access::kWrite, {agrt::DType::kInt64}, s);
        if (!views.empty() && views[0].device != o.view.device) {
          throw agrt::ValueError("out: expected a buffer on " + views[0].device.str() + " like tensors[0], got one on " +
                                 o.view.device.str());
        }
        agrt::TensorView ws;
        agrt::bindings::BorrowedTensor wb;
        if (!workspace.is_none()) {
          wb = agrt::bindings::borrow_tensor(workspace, "workspace", Access::kWrite,
                                             agrt::bindings::kFloatingTypes.with(agrt::DType::kInt64), s);
          require_same_device(o, "out", wb, "workspace");
          ws = wb.view;
        }
        py::gil_scoped_release nogil;
        agrt::kernels::grad_stats(views, o.view, ws);
      },
      py::arg("tensors"), py::arg("out"), py::arg("workspace") = py::none(), py::arg("stream") = py::none(),
      "Fused statistics of a list of tensors into out ((len+1) x grad_stats_fields() float64 words "
      "viewed as int64); see autoglm_rt.ops.grad_stats.");
}

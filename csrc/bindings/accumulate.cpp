// Bindings of the fused gradient accumulation (autoglm_rt.ops.add_sumsq_ is the public API).
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/accumulate.h"
#include "bindings/registry.h"
#include "bindings/tensor_boundary.h"

namespace py = pybind11;
using agrt::bindings::Access;

namespace {

// Plain torch tensors through the attribute fast path, anything else through DLPack (kept alive
// in `keep`).
std::vector<agrt::TensorView> borrow(py::handle seq, const char* name, Access access,
                                     std::vector<agrt::bindings::BorrowedTensor>& keep) {
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq) || py::hasattr(seq, "__dlpack__")) {
    throw agrt::TypeError(std::string(name) + ": expected a list or tuple of tensors, got " +
                          std::string(py::str(py::type::handle_of(seq).attr("__qualname__"))));
  }
  auto items = py::reinterpret_borrow<py::sequence>(seq);
  std::vector<agrt::TensorView> views(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string item_name = std::string(name) + "[" + std::to_string(i) + "]";
    py::object item = items[i];
    if (!agrt::bindings::view_torch_tensor(item, item_name, std::nullopt, views[i])) {
      keep.push_back(agrt::bindings::borrow_tensor(item, item_name, access));
      views[i] = keep.back().view;
    }
  }
  return views;
}

}  // namespace

AGRT_BINDINGS(accumulate) {
  m.def(
      "add_sumsq",
      [](py::handle dst, py::handle src) {
        std::vector<agrt::bindings::BorrowedTensor> keep;
        const auto d = borrow(dst, "dst", Access::kWrite, keep);
        const auto s = borrow(src, "src", Access::kRead, keep);
        py::gil_scoped_release nogil;
        return agrt::kernels::add_sumsq(d, s);
      },
      py::arg("dst"), py::arg("src"),
      "dst[i] += src[i] (float32 CPU tensors, in place) and the float64 sum of squares of src, in one pass; "
      "dst may be empty. See autoglm_rt.ops.add_sumsq_.");
}

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

AGRT_BINDINGS(accumulate) {
  m.def(
      "add_sumsq",
      [](py::handle dst, py::handle src) {
        std::vector<agrt::bindings::BorrowedTensor> keep;
        const auto d = agrt::bindings::borrow_floating_views(dst, "dst", Access::kWrite, std::nullopt, keep);
        const auto s = agrt::bindings::borrow_floating_views(src, "src", Access::kRead, std::nullopt, keep);
        py::gil_scoped_release nogil;
        return agrt::kernels::add_sumsq(d, s);
      },
      py::arg("dst"), py::arg("src"),
      "dst[i] += src[i] (float32 CPU tensors, in place) and the float64 sum of squares of src, in one pass; "
      "dst may be empty. See autoglm_rt.ops.add_sumsq_.");
}

// Bindings of the fused top-k compression (autoglm_rt.ops.topk_compress / topk_decompress).
#include <pybind11/pybind11.h>

#include "autoglm_rt/kernels/topk.h"
#include "bindings/registry.h"
#include "bindings/tensor_boundary.h"

namespace py = pybind11;
using agrt::bindings::Access;
using agrt::bindings::borrow_tensor;
using agrt::bindings::kFloatingTypes;
using agrt::bindings::kIndexTypes;

AGRT_BINDINGS(topk) {
  m.def(
      "topk_compress",
      [](py::handle grad, py::handle residual, std::int64_t k, py::handle values, py::handle indices,
         py::handle stream, py::handle sq_norm) {
        const auto s = agrt::bindings::parse_stream(stream);
        auto g = borrow_tensor(grad, "grad", Access::kRead, kFloatingTypes, s);
        agrt::bindings::BorrowedTensor r;
        if (!residual.is_none()) {
          r = borrow_tensor(residual, "residual", Access::kWrite, kFloatingTypes, s);
          agrt::bindings::require_same_device(g, "grad", r, "residual");
        }
        auto v = borrow_tensor(values, "values_out", Access::kWrite, kFloatingTypes, s);
        auto i = borrow_tensor(indices, "indices_out", Access::kWrite, kIndexTypes, s);
        agrt::bindings::require_same_device(g, "grad", v, "values_out");
        agrt::bindings::require_same_device(g, "grad", i, "indices_out");
        // sq_norm_out is one float64; the boundary speaks no float64, so it arrives as int64 bits.
        agrt::bindings::BorrowedTensor q;
        if (!sq_norm.is_none()) {
          q = borrow_tensor(sq_norm, "sq_norm_out", Access::kWrite, agrt::bindings::DTypeSet{agrt::DType::kInt64}, s);
          agrt::bindings::require_same_device(g, "grad", q, "sq_norm_out");
        }
        py::gil_scoped_release nogil;
        agrt::kernels::topk_compress(g.view, r.view, k, v.view, i.view, q.view);
      },
      py::arg("grad"), py::arg("residual"), py::arg("k"), py::arg("values"), py::arg("indices"),
      py::arg("stream") = py::none(), py::arg("sq_norm") = py::none(),
      "Fused top-k of |grad + residual| into values/indices (index order); residual updated in place.");
  m.def(
      "topk_decompress",
      [](py::handle values, py::handle indices, py::handle out, double scale, py::handle stream, bool check_indices) {
        const auto s = agrt::bindings::parse_stream(stream);
        auto v = borrow_tensor(values, "values", Access::kRead, kFloatingTypes, s);
        auto i = borrow_tensor(indices, "indices", Access::kRead, kIndexTypes, s);
        auto o = borrow_tensor(out, "out", Access::kWrite, kFloatingTypes, s);
        agrt::bindings::require_same_device(o, "out", v, "values");
        agrt::bindings::require_same_device(o, "out", i, "indices");
        py::gil_scoped_release nogil;
        agrt::kernels::topk_decompress(v.view, i.view, o.view, scale, check_indices);
      },
      py::arg("values"), py::arg("indices"), py::arg("out"), py::arg("scale") = 1.0, py::arg("stream") = py::none(),
      py::arg("check_indices") = true,
      "out[indices] += scale * values (duplicates accumulate); unchecked, indices outside out are skipped.");
}

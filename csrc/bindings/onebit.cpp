// Bindings of the fused 1-bit (sign) compression (autoglm_rt.ops.sign_compress / sign_decompress).
#include <pybind11/pybind11.h>

#include "autoglm_rt/kernels/onebit.h"
#include "bindings/registry.h"
#include "bindings/tensor_boundary.h"

namespace py = pybind11;
using agrt::DType;
using agrt::bindings::Access;
using agrt::bindings::borrow_rows;
using agrt::bindings::borrow_tensor;
using agrt::bindings::DTypeSet;

namespace {

constexpr DTypeSet kF32{DType::kFloat32};
constexpr DTypeSet kU8{DType::kUInt8};

agrt::kernels::SignRows to_rows(const agrt::bindings::BorrowedRows& b) {
  return agrt::kernels::SignRows{b.tensor.view, b.rows, b.row_len, b.row_stride};
}

}  // namespace

AGRT_BINDINGS(onebit) {
  m.def(
      "sign_compress",
      [](py::handle x, py::handle error, std::int64_t chunk, py::handle bits, py::handle scales, py::handle stream) {
        const auto s = agrt::bindings::parse_stream(stream);
        auto xv = borrow_tensor(x, "x", Access::kRead, kF32, s);
        agrt::bindings::BorrowedTensor ev;
        if (!error.is_none()) {
          ev = borrow_tensor(error, "error", Access::kWrite, kF32, s);
          agrt::bindings::require_same_device(xv, "x", ev, "error");
        }
        auto bv = borrow_tensor(bits, "bits_out", Access::kWrite, kU8, s);
        auto sv = borrow_tensor(scales, "scales_out", Access::kWrite, kF32, s);
        agrt::bindings::require_same_device(xv, "x", bv, "bits_out");
        agrt::bindings::require_same_device(xv, "x", sv, "scales_out");
        py::gil_scoped_release nogil;
        agrt::kernels::sign_compress(xv.view, error.is_none() ? nullptr : &ev.view, chunk, bv.view, sv.view);
      },
      py::arg("x"), py::arg("error"), py::arg("chunk"), py::arg("bits"), py::arg("scales"),
      py::arg("stream") = py::none(),
      "Signs of x + error packed into bits, per-chunk mean |x + error| into scales; error updated in place.");
  m.def(
      "sign_decompress",
      [](py::handle bits, py::handle scales, py::handle out, std::int64_t chunk, double scale, py::handle stream) {
        const auto s = agrt::bindings::parse_stream(stream);
        auto bv = borrow_rows(bits, "bits", Access::kRead, kU8, s);
        auto sv = borrow_rows(scales, "scales", Access::kRead, kF32, s);
        auto ov = borrow_tensor(out, "out", Access::kWrite, kF32, s);
        agrt::bindings::require_same_device(ov, "out", bv.tensor, "bits");
        agrt::bindings::require_same_device(ov, "out", sv.tensor, "scales");
        py::gil_scoped_release nogil;
        agrt::kernels::sign_decompress(to_rows(bv), to_rows(sv), ov.view, chunk, scale);
      },
      py::arg("bits"), py::arg("scales"), py::arg("out"), py::arg("chunk"), py::arg("scale") = 1.0,
      py::arg("stream") = py::none(),
      "out = scale * sum over rows of the decoded signs (rows in order, float32); rows may be strided.");
}

// Bindings of the fused 1-bit (sign) compression (autoglm_rt.ops.sign_compress / sign_decompress)
// and of the fused 1-bit Adam steps built on it (onebit_adam_compress / onebit_adam_decompress).
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
  m.def(
      "onebit_adam_compress",
      [](py::handle g, py::handle denom, py::handle u, py::handle error, double beta1, std::int64_t chunk,
         py::handle bits, py::handle scales, py::handle sq_norm, py::handle stream) {
        const auto s = agrt::bindings::parse_stream(stream);
        auto gv = borrow_tensor(g, "g", Access::kRead, kF32, s);
        auto dv = borrow_tensor(denom, "denom", Access::kRead, kF32, s);
        auto uv = borrow_tensor(u, "u", Access::kRead, kF32, s);
        auto ev = borrow_tensor(error, "error", Access::kWrite, kF32, s);
        auto bv = borrow_tensor(bits, "bits_out", Access::kWrite, kU8, s);
        auto sv = borrow_tensor(scales, "scales_out", Access::kWrite, kF32, s);
        agrt::bindings::require_same_device(gv, "g", dv, "denom");
        agrt::bindings::require_same_device(gv, "g", uv, "u");
        agrt::bindings::require_same_device(gv, "g", ev, "error");
        agrt::bindings::require_same_device(gv, "g", bv, "bits_out");
        agrt::bindings::require_same_device(gv, "g", sv, "scales_out");
        // sq_norm_out is one float64; the boundary speaks no float64, so it arrives as int64 bits.
        agrt::bindings::BorrowedTensor qv;
        if (!sq_norm.is_none()) {
          qv = borrow_tensor(sq_norm, "sq_norm_out", Access::kWrite, DTypeSet{DType::kInt64}, s);
          agrt::bindings::require_same_device(gv, "g", qv, "sq_norm_out");
        }
        py::gil_scoped_release nogil;
        agrt::kernels::onebit_adam_compress(gv.view, dv.view, uv.view, ev.view, beta1, chunk, bv.view, sv.view,
                                            sq_norm.is_none() ? nullptr : &qv.view);
      },
      py::arg("g"), py::arg("denom"), py::arg("u"), py::arg("error"), py::arg("beta1"), py::arg("chunk"),
      py::arg("bits"), py::arg("scales"), py::arg("sq_norm") = py::none(), py::arg("stream") = py::none(),
      "sign_compress of c = beta1 u + (1 - beta1) g / denom + error (float32, no FMA) in one pass; "
      "error updated, sum g^2 (float64) into sq_norm's 8 bytes.");
  m.def(
      "onebit_adam_decompress",
      [](py::handle bits, py::handle scales, py::handle out, py::handle u, std::int64_t chunk, double scale,
         double bias, py::handle stream) {
        const auto s = agrt::bindings::parse_stream(stream);
        auto bv = borrow_rows(bits, "bits", Access::kRead, kU8, s);
        auto sv = borrow_rows(scales, "scales", Access::kRead, kF32, s);
        auto ov = borrow_tensor(out, "out", Access::kWrite, kF32, s);
        auto uv = borrow_tensor(u, "u", Access::kWrite, kF32, s);
        agrt::bindings::require_same_device(ov, "out", bv.tensor, "bits");
        agrt::bindings::require_same_device(ov, "out", sv.tensor, "scales");
        agrt::bindings::require_same_device(ov, "out", uv, "u");
        py::gil_scoped_release nogil;
        agrt::kernels::onebit_adam_decompress(to_rows(bv), to_rows(sv), ov.view, uv.view, chunk, scale, bias);
      },
      py::arg("bits"), py::arg("scales"), py::arg("out"), py::arg("u"), py::arg("chunk"), py::arg("scale") = 1.0,
      py::arg("bias") = 1.0, py::arg("stream") = py::none(),
      "avg = sign_decompress's value; u = avg where finite; out = avg * bias. One pass.");
}

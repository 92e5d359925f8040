// The extension module autoglm_rt._C: exception mapping, build information, threads and the
// tensor boundary's inspector. Components add their functions with AGRT_BINDINGS.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "autoglm_rt/build_info.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/bandwidth.h"
#include "autoglm_rt/parallel.h"
#include "bindings/registry.h"
#include "bindings/tensor_boundary.h"

namespace py = pybind11;

namespace {

py::dict build_info_dict() {
  const agrt::BuildInfo b = agrt::build_info();
  py::dict d;
  d["version"] = b.version;
  d["cuda_compiled"] = b.cuda_compiled;
  d["cuda_runtime_version"] = b.cuda_runtime_version.empty() ? py::object(py::none()) : py::str(b.cuda_runtime_version);
  py::list archs;
  if (!b.cuda_archs.empty()) {
    std::size_t start = 0;
    while (start <= b.cuda_archs.size()) {
      const std::size_t end = b.cuda_archs.find(',', start);
      archs.append(b.cuda_archs.substr(start, end - start));
      if (end == std::string::npos) break;
      start = end + 1;
    }
  }
  d["cuda_archs"] = archs;
  d["cuda_device_count"] = b.cuda_device_count;
  d["cuda_unavailable_reason"] =
      b.cuda_unavailable_reason.empty() ? py::object(py::none()) : py::str(b.cuda_unavailable_reason);
  d["cpu_threads"] = b.cpu_threads;
  d["compiler"] = b.compiler;
  d["cpu_simd"] = b.cpu_simd;
  return d;
}

agrt::bindings::DTypeSet parse_dtypes(const std::vector<std::string>& names) {
  agrt::bindings::DTypeSet set{};
  for (const auto& n : names) {
    bool found = false;
    for (auto t : {agrt::DType::kFloat32, agrt::DType::kFloat16, agrt::DType::kBFloat16,
                   agrt::DType::kInt32, agrt::DType::kInt64}) {
      if (n == agrt::dtype_name(t)) {
        set = set.with(t);
        found = true;
      }
    }
    if (!found) throw agrt::ValueError("dtypes: unknown dtype name '" + n + "'");
  }
  return set;
}

py::dict view_dict(const agrt::bindings::BorrowedTensor& b) {
  py::dict d;
  d["data_ptr"] = reinterpret_cast<std::uintptr_t>(b.view.data);
  d["dtype"] = agrt::dtype_name(b.view.dtype);
  d["numel"] = b.view.numel;
  d["nbytes"] = b.view.nbytes();
  d["device"] = b.view.device.str();
  d["stream"] = b.view.stream;
  d["read_only"] = b.view.read_only;
  d["shape"] = py::tuple(py::cast(b.shape));
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "autoglm_rt native core";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const agrt::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const agrt::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const agrt::RuntimeError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("build_info", &build_info_dict, "What this build contains and what the machine offers it.");
  m.def("num_threads", &agrt::num_threads, "Threads the CPU kernels use.");
  m.def("set_num_threads", &agrt::set_num_threads, py::arg("n"), "Sets the CPU kernels' thread count.");

  m.def(
      "inspect_tensor",
      [](py::handle obj, const std::string& name, bool writable, const std::vector<std::string>& dtypes,
         py::handle stream) {
        auto b = agrt::bindings::borrow_tensor(obj, name,
                                               writable ? agrt::bindings::Access::kWrite : agrt::bindings::Access::kRead,
                                               parse_dtypes(dtypes), agrt::bindings::parse_stream(stream));
        return view_dict(b);
      },
      py::arg("obj"), py::arg("name") = "tensor", py::arg("writable") = false,
      py::arg("dtypes") = std::vector<std::string>{"float32", "float16", "bfloat16"}, py::arg("stream") = py::none(),
      "The TensorView the native core would see for obj (a dict); raises as a kernel would.");
  m.def(
      "inspect_tensor_list",
      [](py::handle seq, const std::string& name, bool writable) {
        auto bs = agrt::bindings::borrow_tensor_list(
            seq, name, writable ? agrt::bindings::Access::kWrite : agrt::bindings::Access::kRead);
        py::list out;
        for (const auto& b : bs) out.append(view_dict(b));
        return out;
      },
      py::arg("seq"), py::arg("name") = "tensors", py::arg("writable") = false,
      "TensorViews of a list of tensors on one device.");

  m.def(
      "read_checksum",
      [](py::handle buf) {
        auto b = agrt::bindings::borrow_tensor(buf, "buffer", agrt::bindings::Access::kRead,
                                               {agrt::DType::kFloat32, agrt::DType::kInt32, agrt::DType::kInt64,
                                                agrt::DType::kFloat16, agrt::DType::kBFloat16});
        py::gil_scoped_release nogil;
        return agrt::kernels::read_checksum(b.view);
      },
      py::arg("buffer"), "Reads every byte of a CPU buffer on all threads (bandwidth probe).");
  m.def(
      "parallel_copy",
      [](py::handle dst, py::handle src) {
        const agrt::bindings::DTypeSet any{agrt::DType::kFloat32, agrt::DType::kInt32, agrt::DType::kInt64,
                                           agrt::DType::kFloat16, agrt::DType::kBFloat16};
        auto d = agrt::bindings::borrow_tensor(dst, "dst", agrt::bindings::Access::kWrite, any);
        auto s = agrt::bindings::borrow_tensor(src, "src", agrt::bindings::Access::kRead, any);
        py::gil_scoped_release nogil;
        agrt::kernels::parallel_copy(d.view, s.view);
      },
      py::arg("dst"), py::arg("src"), "Copies src into dst on all threads (bandwidth probe).");

  agrt::bindings::run_registered_bindings(m);
}

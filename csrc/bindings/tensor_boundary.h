// The one place where Python objects become TensorViews. Anything that implements the DLPack
// protocol (__dlpack__ / __dlpack_device__: torch, numpy, cupy, jax) is accepted; the view
// borrows the producer's memory and stays valid while the BorrowedTensor lives.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "autoglm_rt/tensor_view.h"

namespace agrt::bindings {

enum class Access { kRead, kWrite };

/// A set of accepted dtypes, as a bitmask over DType.
class DTypeSet {
 public:
  constexpr DTypeSet(std::initializer_list<DType> types) {
    for (DType t : types) bits_ |= 1u << static_cast<unsigned>(t);
  }
  constexpr DTypeSet with(DType t) const {
    DTypeSet s = *this;
    s.bits_ |= 1u << static_cast<unsigned>(t);
    return s;
  }
  constexpr bool contains(DType t) const { return (bits_ >> static_cast<unsigned>(t)) & 1u; }
  std::string describe() const;  // "float32, float16 or bfloat16"

 private:
  unsigned bits_ = 0;
};

inline constexpr DTypeSet kFloatingTypes{DType::kFloat32, DType::kFloat16, DType::kBFloat16};
inline constexpr DTypeSet kIndexTypes{DType::kInt32, DType::kInt64};

struct BorrowedTensor {
  TensorView view;
  std::vector<std::int64_t> shape;
  pybind11::object keepalive;  // the DLPack capsule; its destructor returns the export
};

/// Borrows `obj` as a contiguous tensor. `arg` names the argument in error messages.
/// `stream`: the CUDA stream the caller will use (cudaStream_t as an integer; 0 = legacy
/// default); the producer is asked to make the data ready on it. Ignored for CPU data.
/// Throws agrt::TypeError (no DLPack, unsupported dtype or device, non-contiguous) or
/// agrt::ValueError (read-only where `access` is kWrite, or the producer refused the export).
BorrowedTensor borrow_tensor(pybind11::handle obj, const std::string& arg, Access access,
                             DTypeSet allowed = kFloatingTypes,
                             std::optional<std::uintptr_t> stream = std::nullopt);

/// Rows of a 1-D (one row) or 2-D tensor whose rows are each contiguous but may lie any distance
/// apart, such as per-rank slices of one gathered message buffer. `tensor.view` spans from the
/// first row's first element to the last row's last element ((rows - 1) * row_stride + row_len
/// elements; 0 when empty), so it covers the gaps between rows too: pass it only where those
/// bytes are read, never written, or treat them as part of the tensor for overlap checks.
struct BorrowedRows {
  BorrowedTensor tensor;
  std::int64_t rows = 0;
  std::int64_t row_len = 0;
  std::int64_t row_stride = 0;  // elements from one row's start to the next (>= row_len)
};

/// Borrows `obj` as rows (see BorrowedRows) without copying. Throws agrt::TypeError as
/// borrow_tensor does, and for an inner stride other than 1 or overlapping rows (a negative or
/// too small row stride); agrt::ValueError for a tensor of other than one or two dimensions or,
/// under Access::kWrite, a read-only one.
BorrowedRows borrow_rows(pybind11::handle obj, const std::string& arg, Access access, DTypeSet allowed,
                         std::optional<std::uintptr_t> stream = std::nullopt);

/// Borrows every element of a sequence; all must be on one device (ValueError otherwise,
/// naming the first one that differs). Elements are named arg[i].
std::vector<BorrowedTensor> borrow_tensor_list(pybind11::handle seq, const std::string& arg,
                                               Access access, DTypeSet allowed = kFloatingTypes,
                                               std::optional<std::uintptr_t> stream = std::nullopt);

/// The fast path for a plain torch.Tensor or nn.Parameter: fills `v` from a few attribute reads
/// (torch's DLPack export costs ~10 us per tensor). Returns false, touching nothing, for anything
/// else (the caller then uses borrow_tensor). Throws agrt::TypeError for a dtype outside
/// kFloatingTypes, a non-strided layout, a non-contiguous tensor or a device other than CPU/CUDA.
bool view_torch_tensor(pybind11::handle obj, const std::string& name, std::optional<std::uintptr_t> stream,
                       TensorView& v);

/// Views of every element of a sequence of floating tensors, all on one device: plain torch
/// tensors through view_torch_tensor, anything else through borrow_tensor (its keep-alive is
/// appended to `keep`, which must outlive the views). Elements are named arg[i]. Throws TypeError
/// for something that is not a list or tuple, ValueError naming the first element on another
/// device.
std::vector<TensorView> borrow_floating_views(pybind11::handle seq, const std::string& arg, Access access,
                                              std::optional<std::uintptr_t> stream,
                                              std::vector<BorrowedTensor>& keep);

/// Throws agrt::ValueError unless `b` is on the same device as `a`.
void require_same_device(const BorrowedTensor& a, const std::string& a_name, const BorrowedTensor& b,
                         const std::string& b_name);

/// Parses a Python stream argument: None, an int, or an object with .cuda_stream / .ptr.
std::optional<std::uintptr_t> parse_stream(pybind11::handle stream);

}  // namespace agrt::bindings

// Error types and checking macros of the C++ core. The bindings translate each type to the
// Python exception of the same name (TypeError, ValueError, MemoryError subclass, RuntimeError).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace agrt {

/// Wrong kind of argument: dtype, device, layout.
class TypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Right kind, wrong value: sizes, ranges, unknown pointers.
class ValueError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Internal failure or a failing dependency (CUDA runtime, upstream allocator).
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace agrt

/// AGRT_EXPECTS(cond, ExcType, message parts...): throws ExcType("message parts") when cond is
/// false. Messages are written for users: say what was wrong and what was expected.
#define AGRT_EXPECTS(cond, ExcType, ...)                                  \
  do {                                                                    \
    if (!(cond)) throw ExcType(::agrt::detail::concat(__VA_ARGS__));      \
  } while (0)

/// AGRT_FAIL(ExcType, message parts...): internal error with file and line.
#define AGRT_FAIL(ExcType, ...) \
  throw ExcType(::agrt::detail::concat(__VA_ARGS__, " [", __FILE__, ":", __LINE__, "]"))

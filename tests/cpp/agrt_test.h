// A minimal unit-test harness for the C++ core: TEST(name) { CHECK(...); }, one binary per file,
// run by ctest. Failures print file:line and the expression; the binary exits non-zero.
#pragma once

#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace agrt_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> c;
  return c;
}
inline int& failures() {
  static int f = 0;
  return f;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};

inline int run_all() {
  int failed_cases = 0;
  for (auto& c : cases()) {
    const int before = failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  unexpected exception: %s\n", e.what());
      ++failures();
    }
    const bool ok = failures() == before;
    failed_cases += ok ? 0 : 1;
    std::printf("[%s] %s\n", ok ? "  OK  " : " FAIL ", c.name);
  }
  std::printf("%zu cases, %d failed\n", cases().size(), failed_cases);
  return failed_cases == 0 ? 0 : 1;
}

}  // namespace agrt_test

#define TEST(name)                                                         \
  static void agrt_test_##name();                                          \
  static const ::agrt_test::Register agrt_test_reg_##name(#name, agrt_test_##name); \
  static void agrt_test_##name()

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++::agrt_test::failures();                                                     \
    }                                                                                \
  } while (0)

#define CHECK_THROWS(ExcType, expr)                                                          \
  do {                                                                                       \
    bool agrt_thrown = false;                                                                \
    try {                                                                                    \
      (void)(expr);                                                                          \
    } catch (const ExcType&) {                                                               \
      agrt_thrown = true;                                                                    \
    }                                                                                        \
    if (!agrt_thrown) {                                                                      \
      std::fprintf(stderr, "  %s:%d: %s did not throw %s\n", __FILE__, __LINE__, #expr, #ExcType); \
      ++::agrt_test::failures();                                                             \
    }                                                                                        \
  } while (0)

#define AGRT_TEST_MAIN() \
  int main() { return ::agrt_test::run_all(); }

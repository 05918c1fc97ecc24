// Declarations only: see ../README.md.
#pragma once
#include <chrono>

namespace gloo {
// An inline member of ProcessGroupGloo calls `setTimeout` on its contexts, so
// the header needs this member declared; the definition lives in libtorch_cpu.
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo

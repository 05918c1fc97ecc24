// libtorch's own operator profiler (Kineto, CPU activity), which the C API tch
// wraps does not expose: start it, then stop it and write one line per
// recorded operator call (`thread \t start_ns \t duration_ns \t name \t
// input dtypes \t input shapes`) for the Rust side to aggregate.
#include <fstream>
#include <set>

#include <torch/csrc/autograd/profiler_kineto.h>

namespace {
namespace prof = torch::profiler::impl;

prof::ProfilerConfig cpu_config() {
  return prof::ProfilerConfig(prof::ProfilerState::KINETO, /*report_input_shapes=*/true);
}

std::set<prof::ActivityType> cpu_activity() { return {prof::ActivityType::CPU}; }
}  // namespace

extern "C" {

// Starts recording operator calls on this thread (and the autograd engine's);
// 0 on success.
int dg_profiler_start() {
  try {
    torch::autograd::profiler::prepareProfiler(cpu_config(), cpu_activity());
    torch::autograd::profiler::enableProfiler(cpu_config(), cpu_activity());
    return 0;
  } catch (...) {
    return 1;
  }
}

// Stops recording and writes the events to `path`; the number of events, or
// -1 when the profiler was not running or the file could not be written.
int64_t dg_profiler_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    std::ofstream out(path);
    if (!result || !out) {
      return -1;
    }
    int64_t n = 0;
    for (const auto& e : result->events()) {
      out << e.startThreadId() << '\t' << e.startNs() << '\t' << e.durationNs() << '\t'
          << e.name() << '\t';
      const char* sep = "";
      for (const auto& d : e.dtypes()) {
        out << sep << d;
        sep = ",";
      }
      out << '\t';
      sep = "";
      for (const auto& shape : e.shapes()) {
        out << sep << '[';
        for (size_t i = 0; i < shape.size(); ++i) {
          out << (i ? "," : "") << shape[i];
        }
        out << ']';
        sep = ";";
      }
      out << '\n';
      ++n;
    }
    return out ? n : -1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// The Python extension module logitkit._C_emulated: logitkit's CUDA kernels
// compiled for the host through the SIMT emulator (csrc/simt), registered
// for CPU tensors under the `logitkit_emulated` op namespace with the same
// schemas as `logitkit`. Test infrastructure: it is slow by design (one OS
// thread per CUDA thread).
#include <cstdint>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "../cuda/launch_config.h"
#include "../ops/schemas.h"
#include "../simt/simt.h"

TORCH_LIBRARY(logitkit_emulated, m) { logitkit::define_schemas(m); }

namespace logitkit::simt {
std::vector<int64_t> run_selftest(const std::string& name, int threads, int blocks);
}
namespace logitkit::cuda {
int gathered_top_k();
int gather_capacity();
int crossing_capacity();
int top_k_crossing_capacity();
}  // namespace logitkit::cuda

namespace {

void configure(int threads_per_block, int64_t max_elements_per_block, const std::string& schedule, uint64_t seed,
               bool one_cpu) {
  if (threads_per_block < 1 || threads_per_block > 1024) {
    throw pybind11::value_error("threads_per_block must be in [1, 1024]");
  }
  if (max_elements_per_block < 0) throw pybind11::value_error("max_elements_per_block must be >= 0");
  auto& s = logitkit::simt::settings();
  if (schedule == "in_order") {
    s.schedule = logitkit::simt::Schedule::in_order;
  } else if (schedule == "reversed") {
    s.schedule = logitkit::simt::Schedule::reversed;
  } else if (schedule == "random") {
    s.schedule = logitkit::simt::Schedule::random;
  } else {
    throw pybind11::value_error("schedule must be 'in_order', 'reversed' or 'random', got '" + schedule + "'");
  }
  s.seed = seed;
  s.one_cpu = one_cpu;
  auto& shape = logitkit::cuda::emulated_launch_shape();
  shape.threads_per_block = threads_per_block;
  shape.max_elements_per_block = max_elements_per_block;
}

pybind11::dict current_configuration() {
  const auto& s = logitkit::simt::settings();
  const auto& shape = logitkit::cuda::emulated_launch_shape();
  static const char* names[] = {"in_order", "reversed", "random"};
  pybind11::dict d;
  d["threads_per_block"] = shape.threads_per_block.load();
  d["max_elements_per_block"] = shape.max_elements_per_block.load();
  d["schedule"] = names[static_cast<int>(s.schedule)];
  d["seed"] = s.seed;
  d["deadlock_timeout_s"] = s.timeout_seconds;
  d["one_cpu"] = s.one_cpu;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_emulated, module) {
  module.doc() = "logitkit CUDA kernels run on the CPU through the SIMT emulator (torch.ops.logitkit_emulated)";
  module.def("configure", &configure, pybind11::arg("threads_per_block") = 80,
             pybind11::arg("max_elements_per_block") = 0, pybind11::arg("schedule") = "in_order",
             pybind11::arg("seed") = 0, pybind11::arg("one_cpu") = true,
             "Launch shape and thread schedule of emulated launches. threads_per_block that is not a multiple of "
             "32 gives a partial last warp; max_elements_per_block > 0 splits each row over several blocks. "
             "one_cpu: a launch's threads take turns on the CPU it starts on (Linux; faster where waking threads "
             "on other cores is costly) instead of running in parallel.");
  module.def("configuration", &current_configuration);
  // The sampler family's gathered path: a top-k of at most gathered_top_k tokens gathers its
  // survivors, ties included, into gather_capacity slots (csrc/cuda/row_filters_kernels.cuh);
  // typical and top-p gather a crossing bin of at most crossing_capacity candidates, top-k
  // (not gathering its survivors) one of at most top_k_crossing_capacity tokens.
  module.attr("gathered_top_k") = logitkit::cuda::gathered_top_k();
  module.attr("gather_capacity") = logitkit::cuda::gather_capacity();
  module.attr("crossing_capacity") = logitkit::cuda::crossing_capacity();
  module.attr("top_k_crossing_capacity") = logitkit::cuda::top_k_crossing_capacity();
  module.def(
      "set_deadlock_timeout", [](double seconds) { logitkit::simt::settings().timeout_seconds = seconds; },
      pybind11::arg("seconds"), "Seconds a barrier may wait before the launch fails as a deadlock.");
  module.def(
      "count_row_reads",
      [](bool on) {
        auto& counter = logitkit::simt::row_read_counter();
        counter.reads = 0;
        counter.on = on;
      },
      pybind11::arg("on"),
      "Starts (on=True, from 0) or stops counting the kernels' reads of input row elements (row_reads()): "
      "reads / (rows * cols) is the number of passes over the rows (tests of the pass budgets).");
  module.def("row_reads", [] { return logitkit::simt::row_read_counter().reads.load(); });
  module.def("selftest", &logitkit::simt::run_selftest, pybind11::arg("name"), pybind11::arg("threads"),
             pybind11::arg("blocks") = 1, "Runs one of the emulator's self-test kernels (tests/test_emulator.py).");
}

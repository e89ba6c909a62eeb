// The Python extension module logitkit._C. Importing it registers the
// `logitkit` operators (static initialisers of the linked kernel files);
// it also reports how the library was built.
#include <string>

#include <pybind11/pybind11.h>

namespace logitkit::cpu {
std::string selected_cpu_capability();
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "logitkit kernels (operators are registered under torch.ops.logitkit)";
  module.def("build_info", [] {
    pybind11::dict info;
    info["version"] = LOGITKIT_VERSION;
    info["torch_version"] = LOGITKIT_TORCH_VERSION;
    info["cuda_compiled"] = static_cast<bool>(LOGITKIT_WITH_CUDA);
    info["cuda_architectures"] = LOGITKIT_CUDA_ARCHITECTURES;
    info["cuda_version"] = LOGITKIT_CUDA_VERSION;
    info["cpu_capability"] = logitkit::cpu::selected_cpu_capability();
    return info;
  });
}

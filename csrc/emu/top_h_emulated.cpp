// The CUDA Top-H ops (top_h_mask, sample), compiled by the host compiler through the SIMT
// emulator (simt.h sees no __CUDACC__) and registered under logitkit_emulated/CPU.
#include "../cuda/top_h.cu"

namespace logitkit::cuda {
// The sampler family's gather sizes, read by the tests of the pass budgets (module.cpp).
int gathered_top_k() { return kGatheredSurvivors; }
int gather_capacity() { return kGatherCapacity; }
int crossing_capacity() { return kCrossingCapacity; }
int top_k_crossing_capacity() { return kTopKCrossingCapacity; }
}  // namespace logitkit::cuda

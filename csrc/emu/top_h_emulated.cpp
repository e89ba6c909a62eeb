// The CUDA Top-H ops (top_h_mask, sample), compiled by the host compiler through the SIMT
// emulator (simt.h sees no __CUDACC__) and registered under logitkit_emulated/CPU.
#include "../cuda/top_h.cu"

// The CUDA top_h_mask kernel, compiled by the host compiler through the SIMT
// emulator (simt.h sees no __CUDACC__) and registered under logitkit_emulated/CPU.
#include "../cuda/top_h.cu"

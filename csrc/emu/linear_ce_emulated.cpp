// The CUDA linear cross-entropy ops, compiled by the host compiler through the
// SIMT emulator (simt.h sees no __CUDACC__) and registered under
// logitkit_emulated/CPU.
#include "../cuda/linear_ce.cu"

// The CUDA row ops, compiled by the host compiler through the SIMT emulator
// (simt.h sees no __CUDACC__) and registered under logitkit_emulated/CPU.
#include "../cuda/row_ops.cu"

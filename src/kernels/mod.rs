//! CUDA kernels: launch parameters shared with `cuda/include/params.h`, the embedded fatbin
//! report, and the CPU (SIMT emulation) launcher.

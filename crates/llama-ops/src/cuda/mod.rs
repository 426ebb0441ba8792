//! CUDA kernels (placeholder while the CPU path lands).

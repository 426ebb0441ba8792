// Design experiment behind kernels/norm.cu: bf16 RMSNorm with 256/128/64 threads per row (row
// kept in registers) or a warp per row, at 576 … 8192 channels; kernel time by CUDA events.
#include <cstdio>
__device__ __forceinline__ float bf(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ unsigned short tobf(float v) { unsigned u = __float_as_uint(v); u += 0x7fffu + ((u >> 16) & 1u); return u >> 16; }
__device__ __forceinline__ float warp_sum(float v) { for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o); return v; }
__device__ float block_sum(float v) {
  __shared__ float part[32]; v = warp_sum(v); int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads(); if (!lane) part[w] = v; __syncthreads(); v = lane < (blockDim.x >> 5) ? part[lane] : 0; return warp_sum(v);
}
// ROWS_PER_BLOCK rows per block: each row handled by blockDim/RPB threads... simple: 1 row/block, P packs per thread in regs.
template <int P>
__global__ void rms(const uint4* x, const uint4* w, uint4* y, int dim, float eps) {
  int packs = dim / 8; const uint4* xr = x + (size_t)blockIdx.x * packs; uint4* yr = y + (size_t)blockIdx.x * packs;
  uint4 v[P]; float ss = 0;
#pragma unroll
  for (int k = 0; k < P; ++k) { int p = threadIdx.x + k * blockDim.x; if (p < packs) { v[k] = xr[p]; unsigned short* a = (unsigned short*)&v[k];
#pragma unroll
    for (int i = 0; i < 8; ++i) { float f = bf(a[i]); ss += f * f; } } }
  float r = rsqrtf(block_sum(ss) / dim + eps);
#pragma unroll
  for (int k = 0; k < P; ++k) { int p = threadIdx.x + k * blockDim.x; if (p < packs) { uint4 wv = w[p]; unsigned short* a = (unsigned short*)&v[k]; unsigned short* b = (unsigned short*)&wv; uint4 o; unsigned short* c = (unsigned short*)&o;
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = tobf(bf(b[i]) * bf(tobf(bf(a[i]) * r)));
    yr[p] = o; } }
}
// Warp per row, several rows per block.
template <int P>
__global__ void rms_warp(const uint4* x, const uint4* w, uint4* y, int dim, float eps, int rows) {
  int packs = dim / 8; int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; if (row >= rows) return; int lane = threadIdx.x & 31;
  const uint4* xr = x + (size_t)row * packs; uint4* yr = y + (size_t)row * packs;
  uint4 v[P]; float ss = 0;
#pragma unroll
  for (int k = 0; k < P; ++k) { int p = lane + k * 32; if (p < packs) { v[k] = xr[p]; unsigned short* a = (unsigned short*)&v[k];
#pragma unroll
    for (int i = 0; i < 8; ++i) { float f = bf(a[i]); ss += f * f; } } }
  float r = rsqrtf(warp_sum(ss) / dim + eps);
#pragma unroll
  for (int k = 0; k < P; ++k) { int p = lane + k * 32; if (p < packs) { uint4 wv = w[p]; unsigned short* a = (unsigned short*)&v[k]; unsigned short* b = (unsigned short*)&wv; uint4 o; unsigned short* c = (unsigned short*)&o;
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = tobf(bf(b[i]) * bf(tobf(bf(a[i]) * r)));
    yr[p] = o; } }
}
int main() {
  for (int dim : {576, 2048, 4096, 8192}) {
  int rows = (int)(4096ull * 4096 / dim); size_t bytes = (size_t)rows * dim * 2;
  uint4 *x, *w, *y; cudaMalloc(&x, bytes); cudaMalloc(&w, dim * 2); cudaMalloc(&y, bytes); cudaMemset(x, 0x3c, bytes); cudaMemset(w, 0x3c, dim * 2);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto time = [&](const char* name, auto launch) {
    for (int i = 0; i < 5; ++i) launch();
    cudaEventRecord(a); for (int i = 0; i < 100; ++i) launch(); cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b); double us = ms * 1000 / 100;
    printf("dim %5d rows %6d %-26s %7.1f us %7.1f GB/s\n", dim, rows, name, us, 2.0 * bytes / us / 1e3);
  };
  time("block256 P4", [&] { rms<4><<<rows, 256>>>(x, w, y, dim, 1e-5f); });
  time("block128 P8", [&] { rms<8><<<rows, 128>>>(x, w, y, dim, 1e-5f); });
  time("block64 P16", [&] { rms<16><<<rows, 64>>>(x, w, y, dim, 1e-5f); });
  time("warp/row P32 (8 rows/blk)", [&] { rms_warp<32><<<(rows + 7) / 8, 256>>>(x, w, y, dim, 1e-5f, rows); });
  time("warp/row P32 (4 rows/blk)", [&] { rms_warp<32><<<(rows + 3) / 4, 128>>>(x, w, y, dim, 1e-5f, rows); });
  cudaFree(x); cudaFree(w); cudaFree(y);
  }
}

// Design experiment behind kernels/norm.cu: bf16 RMSNorm with 256/128/64 threads per row (row
// kept in registers) or a warp per row, at 576 … 8192 channels; kernel time by CUDA events.
// CVT: round to bf16 with cvt.rn.bf16x2.f32 (two values an instruction) instead of the integer
// nearest-even sequence; HOIST: load the row's weights beside x, before the reduction.
#include <cstdio>
__device__ __forceinline__ float bf(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ unsigned short tobf(float v) { unsigned u = __float_as_uint(v); u += 0x7fffu + ((u >> 16) & 1u); return u >> 16; }
__device__ __forceinline__ unsigned pack2(float lo, float hi) { unsigned w; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo)); return w; }
__device__ __forceinline__ float rnd(float v) { unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return bf(h); }
__device__ __forceinline__ float warp_sum(float v) { for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(~0u, v, o); return v; }
__device__ float block_sum(float v) {
  __shared__ float part[32]; v = warp_sum(v); int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads(); if (!lane) part[w] = v; __syncthreads(); v = lane < (blockDim.x >> 5) ? part[lane] : 0; return warp_sum(v);
}
// One row a block, P packs a thread kept in registers.
template <int P, bool CVT = false, bool HOIST = false>
__global__ void rms(const uint4* x, const uint4* w, uint4* y, int dim, float eps) {
  int packs = dim / 8; const uint4* xr = x + (size_t)blockIdx.x * packs; uint4* yr = y + (size_t)blockIdx.x * packs;
  uint4 v[P], wv[P]; float ss = 0;
#pragma unroll
  for (int k = 0; k < P; ++k) { int p = threadIdx.x + k * blockDim.x; if (p < packs) { v[k] = xr[p]; if (HOIST) wv[k] = w[p]; unsigned short* a = (unsigned short*)&v[k];
#pragma unroll
    for (int i = 0; i < 8; ++i) { float f = bf(a[i]); ss += f * f; } } }
  float r = rsqrtf(block_sum(ss) / dim + eps);
#pragma unroll
  for (int k = 0; k < P; ++k) { int p = threadIdx.x + k * blockDim.x; if (p < packs) { if (!HOIST) wv[k] = w[p]; unsigned short* a = (unsigned short*)&v[k]; unsigned short* b = (unsigned short*)&wv[k]; uint4 o; unsigned short* c = (unsigned short*)&o;
    if (CVT) { unsigned* q = (unsigned*)&o;
#pragma unroll
      for (int i = 0; i < 4; ++i) q[i] = pack2(bf(b[2 * i]) * rnd(bf(a[2 * i]) * r), bf(b[2 * i + 1]) * rnd(bf(a[2 * i + 1]) * r)); }
    else {
#pragma unroll
      for (int i = 0; i < 8; ++i) c[i] = tobf(bf(b[i]) * bf(tobf(bf(a[i]) * r))); }
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
  // kernels/norm.cu now: the fewest warps that hold the row in 8 packs a thread (norm.rs, row_blocks)
  int warps = (dim / 8 + 255) / 256;
  time("block256 P4 cvt", [&] { rms<4, true><<<rows, 256>>>(x, w, y, dim, 1e-5f); });
  time("fewest warps P8", [&] { rms<8><<<rows, 32 * warps>>>(x, w, y, dim, 1e-5f); });
  time("fewest warps P8 cvt", [&] { rms<8, true><<<rows, 32 * warps>>>(x, w, y, dim, 1e-5f); });
  time("fewest warps P8 cvt hoist", [&] { rms<8, true, true><<<rows, 32 * warps>>>(x, w, y, dim, 1e-5f); });
  cudaFree(x); cudaFree(w); cudaFree(y);
  }
}

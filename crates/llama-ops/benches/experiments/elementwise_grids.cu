// Design experiment behind kernels/activation.cu: bf16 SwiGLU with IEEE or fast division, grids
// of one thread per 16-byte pack or capped, and unrolled steps; kernel time by CUDA events.
#include <cstdio>
#include <cuda_bf16.h>
struct P8 { uint4 raw; };
__device__ __forceinline__ float bf(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ unsigned short tobf(float v) { unsigned u = __float_as_uint(v); if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40; u += 0x7fffu + ((u >> 16) & 1u); return u >> 16; }
template <int MODE> __device__ __forceinline__ float op(float g, float u) {
  if (MODE == 0) return g * u;
  if (MODE == 1) return g / (1.0f + expf(-g)) * u;
  if (MODE == 2) return __fdividef(g, 1.0f + __expf(-g)) * u;
  return g * (1.0f / (1.0f + expf(-g))) * u;
}
template <int MODE, int UN>
__global__ void k(const uint4* g, const uint4* u, uint4* h, size_t packs) {
  size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t base = blockIdx.x * blockDim.x + threadIdx.x; base < packs; base += stride * UN) {
    uint4 gv[UN], uv[UN];
#pragma unroll
    for (int j = 0; j < UN; ++j) { size_t p = base + j * stride; if (p < packs) { gv[j] = g[p]; uv[j] = u[p]; } }
#pragma unroll
    for (int j = 0; j < UN; ++j) { size_t p = base + j * stride; if (p >= packs) break;
      unsigned short* a = (unsigned short*)&gv[j]; unsigned short* b = (unsigned short*)&uv[j]; uint4 o; unsigned short* c = (unsigned short*)&o;
#pragma unroll
      for (int i = 0; i < 8; ++i) c[i] = tobf(bf(tobf(op<MODE>(bf(a[i]), 1.0f))) * bf(b[i]));
      h[p] = o; }
  }
}
int main() {
  size_t n = 4096ull * 14336, packs = n / 8, bytes = n * 2;
  uint4 *g, *u, *h; cudaMalloc(&g, bytes); cudaMalloc(&u, bytes); cudaMalloc(&h, bytes);
  cudaMemset(g, 0x3c, bytes); cudaMemset(u, 0x3c, bytes);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto time = [&](const char* name, auto launch) {
    for (int i = 0; i < 5; ++i) launch();
    cudaEventRecord(a); for (int i = 0; i < 50; ++i) launch(); cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b); double us = ms * 1000 / 50;
    printf("%-40s %8.1f us %8.1f GB/s (3 streams)\n", name, us, 3.0 * bytes / us / 1e3);
  };
  time("memcpy dtod (2 streams)", [&] { cudaMemcpyAsync(h, g, bytes, cudaMemcpyDeviceToDevice); });
  int full = (int)((packs + 255) / 256);
  time("mul grid=packs", [&] { k<0, 1><<<full, 256>>>(g, u, h, packs); });
  time("silu ieee grid=packs", [&] { k<1, 1><<<full, 256>>>(g, u, h, packs); });
  time("silu fast grid=packs", [&] { k<2, 1><<<full, 256>>>(g, u, h, packs); });
  time("silu rcp grid=packs", [&] { k<3, 1><<<full, 256>>>(g, u, h, packs); });
  time("silu ieee grid=65535", [&] { k<1, 1><<<65535, 256>>>(g, u, h, packs); });
  time("silu ieee in place", [&] { k<1, 1><<<full, 256>>>(g, u, g, packs); });
  time("mul in place", [&] { k<0, 1><<<full, 256>>>(g, u, g, packs); });
  time("silu ieee grid=132*16 un4", [&] { k<1, 4><<<132 * 16, 256>>>(g, u, h, packs); });
  time("silu ieee grid=packs/4 un4", [&] { k<1, 4><<<full / 4, 256>>>(g, u, h, packs); });
  time("mul grid=132*8 un1", [&] { k<0, 1><<<132 * 8, 256>>>(g, u, h, packs); });
}

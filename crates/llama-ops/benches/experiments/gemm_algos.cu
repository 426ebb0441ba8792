// cuBLAS GEMM choice at the GPU training step's frozen products (docs/performance.md, LoRA
// training on CUDA): cublasGemmEx's default (what llama-ops' cuda/matmul.rs runs) against each of
// cublasLt's heuristic candidates, bf16 in and out, f32 compute, beta 0 (y = x·Wᵀ) and 1 (y +=
// x·Wᵀ, a LoRA branch or a residual already in y), on random operands (constant ones run the
// tensor cores cooler and faster); then the rank-16 LoRA branch y (+)= xs·Bᵀ at each width.
//   nvcc -O3 -arch=sm_90 -std=c++17 gemm_algos.cu -o gemm_algos -lcublasLt -lcublas
//   ./gemm_algos TOKENS NAME OUT IN [NAME OUT IN ...]
//   ./gemm_algos 8192 q 2048 2048 kv 512 2048 gate 8192 2048 down 2048 8192    (Llama-3.2-1B, 4 × 2048)
//   ./gemm_algos 4096 q 4096 4096 kv 1024 4096 gate 14336 4096 down 4096 14336 (Llama-3-8B, 2 × 2048)
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cublasLt.h>
#define CK(x) do { auto e = (x); if ((int)e != 0) { printf("%s:%d error %d\n", __FILE__, __LINE__, (int)e); exit(1); } } while (0)

__global__ void fill(__nv_bfloat16* x, size_t n, unsigned long long seed, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; z ^= z >> 31;
        x[i] = __float2bfloat16(scale * ((float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f));
    }
}

struct Shape { const char* name; int m, n, k; bool ta; };  // col-major C[m,n] = op(A)[m,k] B[k,n]

int main(int argc, char** argv) {
    if (argc < 5) { printf("usage: %s TOKENS NAME OUT IN [NAME OUT IN ...]\n", argv[0]); return 2; }
    int M = atoi(argv[1]);  // tokens
    std::vector<Shape> shapes;
    for (int i = 2; i + 2 < argc; i += 3) {
        int n = atoi(argv[i + 1]), k = atoi(argv[i + 2]);
        // forward y[M,n] = x[M,k] W^T: col-major C[n,M] = W(T)[n,k] x[k,M]
        shapes.push_back({argv[i], n, M, k, true});
        // backward dx[M,k] = dy[M,n] W: col-major C[k,M] = W[k,n] dy[n,M]
        shapes.push_back({argv[i], k, M, n, false});
    }
    size_t maxe = 0;
    for (auto& s : shapes) { maxe = std::max(maxe, (size_t)s.m * s.k); maxe = std::max(maxe, (size_t)s.k * s.n); maxe = std::max(maxe, (size_t)s.m * s.n); }
    __nv_bfloat16 *a, *b, *c; void* ws; size_t wss = 64 << 20;
    CK(cudaMalloc(&a, maxe * 2)); CK(cudaMalloc(&b, maxe * 2)); CK(cudaMalloc(&c, maxe * 2)); CK(cudaMalloc(&ws, wss));
    fill<<<4096, 256>>>(a, maxe, 1, 0.02f); fill<<<4096, 256>>>(b, maxe, 2, 1.0f); fill<<<4096, 256>>>(c, maxe, 3, 1.0f);
    CK(cudaDeviceSynchronize());
    cublasHandle_t h; CK(cublasCreate(&h));
    cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    auto timeit = [&](auto f) { for (int i = 0; i < 3; ++i) f(); cudaEventRecord(e0); for (int i = 0; i < 20; ++i) f(); cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); return ms * 1000 / 20; };
    for (auto& s : shapes) for (float beta : {0.0f, 1.0f}) {
        float alpha = 1.0f;
        cublasOperation_t ta = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
        int lda = s.ta ? s.k : s.m, ldb = s.k, ldc = s.m;
        float tdef = timeit([&] { cublasGemmEx(h, ta, tb, s.m, s.n, s.k, &alpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &beta, c, CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); });
        cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
        cublasLtMatrixLayout_t la, lb, lc;
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.ta ? s.k : s.m, s.ta ? s.m : s.k, lda));
        CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.k, s.n, ldb));
        CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, s.m, s.n, ldc));
        cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
        CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wss, sizeof(wss)));
        cublasLtMatmulHeuristicResult_t res[32]; int got = 0;
        CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, res, &got));
        float best = 1e9, first = 0; int bi = -1;
        for (int i = 0; i < got; ++i) {
            float t = timeit([&] { cublasLtMatmul(lt, op, &alpha, a, la, b, lb, &beta, c, lc, c, lc, &res[i].algo, ws, wss, 0); });
            if (i == 0) first = t;
            if (t < best) { best = t; bi = i; }
        }
        double tf = 2.0 * s.m * s.n * s.k / 1e12;
        printf("%-6s %s m=%5d n=%5d k=%5d beta=%.0f  default %7.1f us (%4.0f TF/s)  lt#0 %7.1f  best lt#%2d/%2d %7.1f us (%4.0f TF/s)  gain %5.1f%%\n",
               s.name, s.ta ? "fwd" : "bwd", s.m, s.n, s.k, beta, tdef, tf / tdef * 1e6, first, bi, got, best, tf / best * 1e6, 100 * (tdef - best) / tdef);
        cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(lc); cublasLtMatmulDescDestroy(op);
    }
    // The LoRA branch: y [M, out] (+)= xs [M, 16] · B [out, 16]ᵀ, col-major C[out, M] = B(T) xs.
    for (size_t i = 0; i < shapes.size(); i += 2) {
        int out = shapes[i].m, r = 16;
        for (float beta : {0.0f, 1.0f}) {
            float alpha = 1.0f;
            float t = timeit([&] { cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, M, r, &alpha, a, CUDA_R_16BF, r, b, CUDA_R_16BF, r, &beta, c, CUDA_R_16BF, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); });
            double gb = (double)out * M * 2 * (beta ? 2 : 1) / 1e9;
            printf("%-6s lora r=16 out=%5d beta=%.0f  %7.1f us (%5.0f GB/s of y)\n", shapes[i].name, out, beta, t, gb / t * 1e6);
        }
    }
    return 0;
}

// Attention over the paged KV cache (src/engine/local/kv_cache.rs) for a flat batch of query
// tokens from sequences of different lengths: no padding to the longest. One thread block
// per (query token, KV head); the block's NW warps split the token's context (key j goes to
// warp j % NW), each warp keeps an online softmax (running max, sum and weighted V) for
// every query head of the KV head's group (GQA: the K/V rows are read once for the whole
// group), and the warps' partial results are merged at the end. Scores, softmax and
// accumulation are f32 whatever the cache dtype. The blocking is modelled in Rust by
// src/engine/local/attention_blocked.rs, tested there against the naive formula.
//
// Query token t attends to ctx_len[t] context rows rows[ctx_off[t] ..], in position order
// (a decode token sees its whole sequence; a prefill token sees the rows up to its own
// position, which makes the kernel causal without a mask).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define NW 4
#define MAXG 8

typedef unsigned int u32;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void from_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void from_f(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void from_f(__half* p, float x) { *p = __float2half(x); }

template <typename T, int D>
__device__ void paged_attention(const T* q, const T* k_pool, const T* v_pool, const u32* rows,
                                const u32* ctx_off, const u32* ctx_len, T* out, u32 heads,
                                u32 kv_heads, float scale) {
    constexpr int E = D / 32;
    __shared__ float sm_m[NW][MAXG];
    __shared__ float sm_l[NW][MAXG];
    __shared__ float sm_acc[NW][MAXG][D];
    const u32 tok = blockIdx.x, kvh = blockIdx.y;
    const u32 group = heads / kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t qw = (size_t)heads * D, kvw = (size_t)kv_heads * D;

    float qr[MAXG][E], acc[MAXG][E], m[MAXG], l[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            acc[g][e] = 0.f;
            qr[g][e] = g < (int)group ? to_f(q[tok * qw + (kvh * group + g) * D + lane * E + e]) * scale : 0.f;
        }
    }
    const u32 off = ctx_off[tok], len = ctx_len[tok];
    for (u32 j = warp; j < len; j += NW) {
        const size_t row = rows[off + j];
        const T* kr = k_pool + row * kvw + kvh * D + lane * E;
        const T* vr = v_pool + row * kvw + kvh * D + lane * E;
        float kf[E], vf[E];
#pragma unroll
        for (int e = 0; e < E; e++) { kf[e] = to_f(kr[e]); vf[e] = to_f(vr[e]); }
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g >= (int)group) continue;  // (not break: keeps the arrays in registers)
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < E; e++) s += qr[g][e] * kf[e];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            const float mn = fmaxf(m[g], s);
            const float corr = __expf(m[g] - mn);
            const float p = __expf(s - mn);
            l[g] = l[g] * corr + p;
#pragma unroll
            for (int e = 0; e < E; e++) acc[g][e] = acc[g][e] * corr + p * vf[e];
            m[g] = mn;
        }
    }
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (g >= (int)group) continue;
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
#pragma unroll
        for (int e = 0; e < E; e++) sm_acc[warp][g][lane * E + e] = acc[g][e];
    }
    __syncthreads();
    // Merge the warps: y = sum_w acc_w e^(m_w - M) / sum_w l_w e^(m_w - M).
    for (u32 idx = threadIdx.x; idx < group * D; idx += NW * 32) {
        const u32 g = idx / D, d = idx % D;
        float mx = -INFINITY;
        for (int w = 0; w < NW; w++) mx = fmaxf(mx, sm_m[w][g]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < NW; w++) {
            const float c = sm_m[w][g] == -INFINITY ? 0.f : __expf(sm_m[w][g] - mx);
            num += sm_acc[w][g][d] * c;
            den += sm_l[w][g] * c;
        }
        from_f(&out[tok * qw + (kvh * group + g) * D + d], num / den);
    }
}

#define INSTANCE(NAME, T, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(NW * 32) NAME(                                \
        const T* q, const T* k_pool, const T* v_pool, const u32* rows, const u32* ctx_off,     \
        const u32* ctx_len, T* out, u32 heads, u32 kv_heads, float scale) {                    \
        paged_attention<T, D>(q, k_pool, v_pool, rows, ctx_off, ctx_len, out, heads, kv_heads, \
                              scale);                                                          \
    }

INSTANCE(bsa_paged_attention_f32_d64, float, 64)
INSTANCE(bsa_paged_attention_f32_d128, float, 128)
INSTANCE(bsa_paged_attention_f32_d256, float, 256)
INSTANCE(bsa_paged_attention_bf16_d64, __nv_bfloat16, 64)
INSTANCE(bsa_paged_attention_bf16_d128, __nv_bfloat16, 128)
INSTANCE(bsa_paged_attention_bf16_d256, __nv_bfloat16, 256)
INSTANCE(bsa_paged_attention_f16_d64, __half, 64)
INSTANCE(bsa_paged_attention_f16_d128, __half, 128)
INSTANCE(bsa_paged_attention_f16_d256, __half, 256)

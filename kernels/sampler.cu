// Device sampler: per-row temperature / top-k / top-p / min-p over f32 logits, one thread
// block per row, without sorting the vocabulary. Only the chosen ids (and log-probs) leave
// the device.
//
// This is the algorithm of src/engine/sampler/radix.rs, pass for pass and with the same
// arithmetic (read that file's docs first). In short:
//  * weights w = exp((l - m) / T) in f64, stored as the fixed-point integer
//    q = rint(w * 2^s), s = 63 - bits(V): every sum is an exact u64, so shared-memory
//    atomics give the same bits in any order, in every run, and as the Rust reference;
//  * top-k, top-p, min-p and the draw are each a prefix of the order (logit desc, id asc),
//    found by a radix search: 3 histogram passes over the 32-bit logit key
//    (11 + 11 + 10 bits), then, only when several tokens tie at the boundary logit and the
//    boundary falls inside them, one id-ordered pass;
//  * the uniform of the draw is Philox4x32-10 with the CPU sampler's stream layout
//    (src/engine/sampler/philox.rs): key [seed lo, seed hi], counter
//    [step, sample, item lo, item hi], u = (x0 << 21 | x1 >> 11) * 2^-53.

#include <stdint.h>

#define BLOCK 1024
#define NWARPS (BLOCK / 32)
#define FULL 0xffffffffu
#define MAX_BUCKETS 2048

typedef unsigned long long u64;
typedef unsigned int u32;

__device__ __forceinline__ u32 logit_key(float l) {
    u32 bits = __float_as_uint(l + 0.0f);
    u32 asc = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ~asc;
}

__device__ __forceinline__ float key_logit(u32 key) {
    u32 asc = ~key;
    u32 bits = (asc & 0x80000000u) ? (asc & 0x7fffffffu) : ~asc;
    return __uint_as_float(bits);
}

__device__ __forceinline__ bool finite(float l) { return isfinite(l); }

__device__ __forceinline__ void philox(u32 c[4], u32 k0, u32 k1) {
    for (int r = 0; r < 10; r++) {
        if (r > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

// Block-wide exclusive scan of u64; returns the exclusive prefix, *total gets the sum.
__device__ u64 block_exclusive_scan(u64 x, u64* total, u64* warp_sums) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = x;
    for (int o = 1; o < 32; o <<= 1) {
        u64 y = __shfl_up_sync(FULL, inc, o);
        if (lane >= o) inc += y;
    }
    if (lane == 31) warp_sums[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u64 w = warp_sums[lane];
        u64 wi = w;
        for (int o = 1; o < 32; o <<= 1) {
            u64 y = __shfl_up_sync(FULL, wi, o);
            if (lane >= o) wi += y;
        }
        warp_sums[lane] = wi - w;  // exclusive
        if (lane == 31) warp_sums[32] = wi;
    }
    __syncthreads();
    u64 r = warp_sums[warp] + inc - x;
    *total = warp_sums[32];
    __syncthreads();
    return r;
}

struct RowCtx {
    const float* logits;
    u32 vocab;
    double m, t, scale;
};

__device__ __forceinline__ u64 qweight(const RowCtx& r, float l) {
    double w = exp(((double)l - r.m) / r.t);
    return __double2ull_rn(w * r.scale);
}

enum { COUNT = 0, WEIGHT = 1 };
enum { T_FIXED = 0, T_FRACTION = 1, T_UNIFORM = 2 };

struct SearchShared {
    u64 hist[MAX_BUCKETS];
    u32 min_id[1024];
    u64 warp_sums[33];
    u64 before, want, total;
    u32 prefix;
    u32 chosen;
    u32 found_id;
    u32 tie_seen;
};

// Adds x to hist[b] for this lane; lanes of a warp with the same bucket are combined first
// (AGG) to avoid serialising on the few buckets that hold most tokens.
template <bool AGG>
__device__ __forceinline__ void hist_add(u64* hist, bool pred, u32 b, u64 x, bool count) {
    if (!AGG) {
        if (pred) atomicAdd(&hist[b], x);
        return;
    }
    u32 act = __ballot_sync(FULL, pred);
    if (!pred) return;
    u32 peers = __match_any_sync(act, b);
    u32 lane = threadIdx.x & 31;
    u64 s;
    if (count) {
        s = __popc(peers);
    } else {
        // 21-bit pieces: 32 lanes of 2^21 fit in 32 bits.
        u32 s0 = __reduce_add_sync(peers, (u32)(x & 0x1FFFFFu));
        u32 s1 = __reduce_add_sync(peers, (u32)((x >> 21) & 0x1FFFFFu));
        u32 s2 = __reduce_add_sync(peers, (u32)(x >> 42));
        s = (u64)s0 + ((u64)s1 << 21) + ((u64)s2 << 42);
    }
    if (lane == (u32)(__ffs(peers) - 1)) atomicAdd(&hist[b], s);
}

// The shortest rank prefix of {eligible, order key <= limit, q >= qmin} whose measure
// reaches the target; see Row::search in radix.rs. Returns the bound; *total_out = measure
// of the whole support.
template <bool AGG>
__device__ u64 search(const RowCtx& r, SearchShared& sh, u64 limit, u64 qmin, int measure,
                      int tmode, double tparam, u64* total_out) {
    const int shifts[3] = {21, 10, 0};
    const int nbits[3] = {11, 11, 10};
    u32 prefix = 0, prefix_mask = 0;
    bool needs_q = qmin > 0 || measure == WEIGHT;
    if (threadIdx.x == 0) sh.before = 0;
    for (int pass = 0; pass < 3; pass++) {
        int shift = shifts[pass];
        u32 nb = 1u << nbits[pass], dmask = nb - 1;
        bool last = pass == 2;
        for (u32 i = threadIdx.x; i < nb; i += BLOCK) {
            sh.hist[i] = 0;
            if (last) sh.min_id[i] = 0xffffffffu;
        }
        __syncthreads();
        for (u32 base = 0; base < r.vocab; base += BLOCK) {
            u32 i = base + threadIdx.x;
            float l = i < r.vocab ? r.logits[i] : __int_as_float(0x7fc00000);
            bool pred = finite(l);
            u32 key = pred ? logit_key(l) : 0;
            pred = pred && ((((u64)key) << 32) | i) <= limit && (key & prefix_mask) == prefix;
            u64 x = 1;
            if (pred && needs_q) {
                u64 q = qweight(r, l);
                pred = q >= qmin;
                if (measure == WEIGHT) x = q;
            }
            u32 b = (key >> shift) & dmask;
            hist_add<AGG>(sh.hist, pred, b, x, measure == COUNT);
            if (last && pred) atomicMin(&sh.min_id[b], i);
        }
        __syncthreads();
        // Find the bucket where the running measure reaches the target.
        u32 b0 = 2 * threadIdx.x, b1 = b0 + 1;
        u64 h0 = b0 < nb ? sh.hist[b0] : 0, h1 = b1 < nb ? sh.hist[b1] : 0;
        u64 total;
        u64 excl = block_exclusive_scan(h0 + h1, &total, sh.warp_sums);
        if (pass == 0 && threadIdx.x == 0) {
            u64 want;
            if (tmode == T_FIXED) {
                want = (u64)tparam;
            } else if (tmode == T_FRACTION) {
                want = (u64)ceil(tparam * (double)total);
                want = want < 1 ? 1 : (want > total ? total : want);
            } else {
                u64 f = (u64)floor(tparam * (double)total);
                want = (f < total - 1 ? f : total - 1) + 1;
            }
            sh.want = want;
            sh.total = total;
        }
        __syncthreads();
        u64 before = sh.before, want = sh.want;
        __syncthreads();  // everyone has read sh.before before the chosen thread moves it
        u64 lo = before + excl;
        if (lo < want && want <= lo + h0 + h1) {
            if (want <= lo + h0) { sh.chosen = b0; sh.before = lo; }
            else { sh.chosen = b1; sh.before = lo + h0; }
        }
        __syncthreads();
        prefix |= sh.chosen << shift;
        prefix_mask |= dmask << shift;
        __syncthreads();
    }
    u64 want = sh.want, before = sh.before;
    *total_out = sh.total;
    // Measure of one token at the boundary logit (tied tokens have equal measure).
    u64 each = measure == COUNT ? 1 : qweight(r, key_logit(prefix));
    u64 need = (want - before + each - 1) / each;
    u32 id;
    if (need == 1) {
        id = sh.min_id[prefix & 0x3ffu];
    } else {
        // The need-th tied token in id order: an ordered block scan over the row.
        if (threadIdx.x == 0) { sh.tie_seen = 0; sh.found_id = 0xffffffffu; }
        __syncthreads();
        for (u32 base = 0; base < r.vocab; base += BLOCK) {
            u32 i = base + threadIdx.x;
            bool tied = false;
            if (i < r.vocab) {
                float l = r.logits[i];
                if (finite(l) && logit_key(l) == prefix && ((((u64)prefix) << 32) | i) <= limit) {
                    tied = !(qmin > 0) || qweight(r, l) >= qmin;
                }
            }
            u64 n;
            u64 ex = block_exclusive_scan(tied ? 1 : 0, &n, sh.warp_sums);
            u64 seen = sh.tie_seen;
            if (tied && seen + ex + 1 == need) sh.found_id = i;
            __syncthreads();
            if (threadIdx.x == 0) sh.tie_seen = (u32)(seen + n);
            __syncthreads();
            if (sh.found_id != 0xffffffffu) break;
        }
        id = sh.found_id;
    }
    __syncthreads();
    return (((u64)prefix) << 32) | id;
}

template <bool AGG>
__device__ void sample_rows(const float* logits, u32 vocab, const float* temperature,
                            const u32* top_k, const float* top_p, const float* min_p,
                            const u32* streams, u32* out, u32 want_logprobs) {
    // out[row] = token; out[rows + row] = the log-prob's f32 bits when asked.
    u32* tokens = out;
    float* logprobs = want_logprobs ? (float*)(out + gridDim.x) : nullptr;
    __shared__ SearchShared sh;
    __shared__ u64 red_key[NWARPS];
    __shared__ u32 red_n[NWARPS];
    u32 row = blockIdx.x;
    RowCtx r;
    r.logits = logits + (size_t)row * vocab;
    r.vocab = vocab;
    // Pass 1: the first argmax (smallest order key) and the eligible count.
    u64 best = ~0ull;
    u32 n = 0;
    for (u32 i = threadIdx.x; i < vocab; i += BLOCK) {
        float l = r.logits[i];
        if (finite(l)) {
            n++;
            u64 k = (((u64)logit_key(l)) << 32) | i;
            best = k < best ? k : best;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        u64 ob = __shfl_down_sync(FULL, best, o);
        best = ob < best ? ob : best;
        n += __shfl_down_sync(FULL, n, o);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { red_key[warp] = best; red_n[warp] = n; }
    __syncthreads();
    if (warp == 0) {
        best = red_key[lane];
        n = red_n[lane];
        for (int o = 16; o > 0; o >>= 1) {
            u64 ob = __shfl_down_sync(FULL, best, o);
            best = ob < best ? ob : best;
            n += __shfl_down_sync(FULL, n, o);
        }
        if (lane == 0) { red_key[0] = best; red_n[0] = n; }
    }
    __syncthreads();
    best = red_key[0];
    n = red_n[0];
    float t = temperature[row];
    if (n == 0 || t == 0.0f) {
        if (threadIdx.x == 0) {
            tokens[row] = n == 0 ? 0xffffffffu : (u32)best;
            if (logprobs) logprobs[row] = n == 0 ? -INFINITY : 0.0f;
        }
        return;
    }
    u32 shift = 63 - (64 - __clzll((long long)vocab));
    r.m = (double)r.logits[(u32)best];
    r.t = (double)t;
    r.scale = ldexp(1.0, shift);
    u64 limit = ~0ull, total;
    u32 k = top_k[row];
    if (k > 0 && k < n) limit = search<AGG>(r, sh, limit, 0, COUNT, T_FIXED, (double)k, &total);
    float tp = top_p[row];
    if (tp < 1.0f) limit = search<AGG>(r, sh, limit, 0, WEIGHT, T_FRACTION, (double)tp, &total);
    u64 qmin = (u64)ceil((double)min_p[row] * r.scale);
    qmin = qmin < 1 ? 1 : qmin;
    // The uniform of this row's stream at this step.
    const u32* st = streams + (size_t)row * 6;
    u32 c[4] = {st[2], st[3], st[4], st[5]};
    philox(c, st[0], st[1]);
    double u = (double)((((u64)c[0]) << 21) | (c[1] >> 11)) * (1.0 / 9007199254740992.0);
    u64 z;
    u64 bound = search<AGG>(r, sh, limit, qmin, WEIGHT, T_UNIFORM, u, &z);
    if (threadIdx.x == 0) {
        u32 tok = (u32)bound;
        tokens[row] = tok;
        if (logprobs) logprobs[row] = (float)log((double)qweight(r, r.logits[tok]) / (double)z);
    }
}

// One block of BLOCK threads per row (grid = rows). streams: [rows, 6] u32 = key0, key1,
// ctr0..ctr3 per row. out: [2 * rows] u32 (the second half only with want_logprobs).
extern "C" __global__ void __launch_bounds__(BLOCK) bsa_sample_rows(
    const float* logits, u32 vocab, const float* temperature, const u32* top_k,
    const float* top_p, const float* min_p, const u32* streams, u32* out, u32 want_logprobs) {
    sample_rows<true>(logits, vocab, temperature, top_k, top_p, min_p, streams, out, want_logprobs);
}

// Same without warp aggregation of the histogram atomics (A/B timing, a check of the
// aggregation itself: both must give identical tokens).
extern "C" __global__ void __launch_bounds__(BLOCK) bsa_sample_rows_plain(
    const float* logits, u32 vocab, const float* temperature, const u32* top_k,
    const float* top_p, const float* min_p, const u32* streams, u32* out, u32 want_logprobs) {
    sample_rows<false>(logits, vocab, temperature, top_k, top_p, min_p, streams, out, want_logprobs);
}

// headinfer's GPU kernels, compiled at run time by NVRTC once per (device, dtype, head_dim).
//
// Defines set by the compiler call (src/cuda/kernels.rs):
//   HEAD_DIM   elements per head row
//   ELEM_BF16 | ELEM_F16 | ELEM_F32   the element type T of K, V, Q and the output
//
// KV rows live in blocks of `block_size` tokens, each block `[block_size, HEAD_DIM]`
// contiguous, in device memory or in mapped pinned host memory (the kernel reads either the
// same way: the host's through PCIe). A layer's block table is
// `table[head][block][2]` (key pointer, value pointer), indexed by absolute block number
// `pos / block_size`; `table == 0` means "dense": rows at `base + h * s0 + pos * s1`.
// No headers: NVRTC needs none, and the 16-bit conversions are a few lines of PTX.

typedef unsigned short u16;
typedef unsigned long long u64;

#if defined(ELEM_BF16)
typedef u16 T;
__device__ __forceinline__ float to_f(T x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ T from_f(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                          // round to nearest even
    return (T)(u >> 16);
}
#elif defined(ELEM_F16)
typedef u16 T;
__device__ __forceinline__ float to_f(T x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
}
__device__ __forceinline__ T from_f(float f) {
    T r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
#else
typedef float T;
__device__ __forceinline__ float to_f(T x) { return x; }
__device__ __forceinline__ T from_f(float f) { return f; }
#endif

// One 16-byte vector of elements: the unit of every load and store.
#define VEC (16 / (int)sizeof(T))
#define NV (HEAD_DIM / VEC)  // vectors per row

#define LPK (NV > 16 ? 32 : NV > 8 ? 16 : NV > 4 ? 8 : NV > 2 ? 4 : NV > 1 ? 2 : 1)  // lanes per key
#define VPL ((NV + LPK - 1) / LPK)  // vectors per lane
#define KPW (32 / LPK)              // keys per warp step
#define NWARPS 4
#define ROWS 8                      // query rows (query x head of a GQA group) per CTA
#define NEG_INF (-__int_as_float(0x7f800000))

// Kv heads 0..heads leave their keys from from[h] on to the CPU (attention over host memory
// computed there at the same time); the kernel reads only the keys before.
#define MAX_CPU_HEADS 16
struct CpuShare {
    int heads;
    int pad;
    long long from[MAX_CPU_HEADS];
};

struct KvSrc {
    const u64* table;  // [heads][max_blocks][2], or 0 for dense
    int max_blocks;
    int block_size;
    const T* k;        // dense only
    const T* v;
    long long s0, s1;  // dense only: element strides of head and position
};

__device__ __forceinline__ const T* k_row(const KvSrc& s, int h, long long pos) {
    if (s.table) {
        const u64* e = s.table + ((long long)h * s.max_blocks + pos / s.block_size) * 2;
        return (const T*)e[0] + (pos % s.block_size) * HEAD_DIM;
    }
    return s.k + h * s.s0 + pos * s.s1;
}

__device__ __forceinline__ const T* v_row(const KvSrc& s, int h, long long pos) {
    if (s.table) {
        const u64* e = s.table + ((long long)h * s.max_blocks + pos / s.block_size) * 2;
        return (const T*)e[1] + (pos % s.block_size) * HEAD_DIM;
    }
    return s.v + h * s.s0 + pos * s.s1;
}

__device__ __forceinline__ void unpack(const uint4& u, float* f) {
    const T* t = (const T*)&u;
#pragma unroll
    for (int i = 0; i < VEC; i++) f[i] = to_f(t[i]);
}

// Partial attention of up to ROWS query rows over the keys of one split.
//   q        [num_q_heads, q_len, HEAD_DIM] with element strides (q_s0, q_s1, 1)
//   o_part   [num_q_heads * q_len, splits, HEAD_DIM] f32, unnormalised
//   ml_part  [num_q_heads * q_len, splits, 2] f32: running max and sum
// grid (splits, num_kv_heads, ceil(group * q_len / ROWS)), block 32 * NWARPS.
// Query i sits at position seq_len - q_len + i; it sees keys j <= pos with pos - j < window
// (window <= 0: no window). Keys below `lo` are not read (dropped or outside every window).
extern "C" __global__ void __launch_bounds__(32 * NWARPS)
attend_partial(const T* __restrict__ q, long long q_s0, long long q_s1, int q_len,
               KvSrc src, long long seq_len, long long lo, long long keys_per_split,
               int group, float scale, float softcap, int window, CpuShare share,
               float* __restrict__ o_part, float* __restrict__ ml_part) {
    const int split = blockIdx.x, kvh = blockIdx.y;
    const int splits = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int slot = lane / LPK, sub = lane % LPK;  // which key of the warp step, which lane of it
    const int rows_total = group * q_len;
    const int row0 = blockIdx.z * ROWS;
    const int nrows = min(ROWS, rows_total - row0);

    // This lane's slice of every row's query, pre-scaled; each row's position.
    float qf[ROWS][VPL * VEC];
    long long pos[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        int rr = row0 + (r < nrows ? r : 0);
        int qi = rr / group, qh = kvh * group + rr % group;
        pos[r] = seq_len - q_len + qi;
        const T* qrow = q + qh * q_s0 + qi * q_s1;
#pragma unroll
        for (int v = 0; v < VPL; v++) {
            int vi = sub + v * LPK;
#pragma unroll
            for (int e = 0; e < VEC; e++)
                qf[r][v * VEC + e] = vi < NV ? to_f(qrow[vi * VEC + e]) * scale : 0.f;
        }
    }

    float m[ROWS], l[ROWS], acc[ROWS][VPL * VEC];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        m[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < VPL * VEC; e++) acc[r][e] = 0.f;
    }

    const long long ka = lo + split * keys_per_split;
    long long kb = min(seq_len, ka + keys_per_split);
    if (kvh < share.heads) kb = min(kb, share.from[kvh]);
    const int stride = NWARPS * KPW;
    // The loop bound is the same for every lane of a warp (the shuffles below need all 32).
    for (long long jw = ka + warp * KPW; jw < kb; jw += 2 * stride) {
        const long long j0 = jw + slot;
        // Two keys per step, both loads issued before any use: more bytes in flight.
        uint4 kv[2][VPL], vv[2][VPL];
        bool have[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            long long j = j0 + u * stride;
            have[u] = j < kb;
            const T* kr = k_row(src, kvh, have[u] ? j : ka);
            const T* vr = v_row(src, kvh, have[u] ? j : ka);
#pragma unroll
            for (int v = 0; v < VPL; v++) {
                int vi = sub + v * LPK;
                if (have[u] && vi < NV) {
                    kv[u][v] = *(const uint4*)(kr + vi * VEC);
                    vv[u][v] = *(const uint4*)(vr + vi * VEC);
                } else {
                    kv[u][v] = make_uint4(0, 0, 0, 0);
                    vv[u][v] = make_uint4(0, 0, 0, 0);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            long long j = j0 + u * stride;
            float kf[VPL * VEC], vf[VPL * VEC];
#pragma unroll
            for (int v = 0; v < VPL; v++) {
                unpack(kv[u][v], kf + v * VEC);
                unpack(vv[u][v], vf + v * VEC);
            }
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < VPL * VEC; e++) s = fmaf(qf[r][e], kf[e], s);
#pragma unroll
                for (int off = LPK / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
                if (softcap > 0.f) s = softcap * tanhf(s / softcap);
                bool vis = have[u] && r < nrows && j <= pos[r] && (window <= 0 || pos[r] - j < window);
                if (!vis) continue;
                float mn = fmaxf(m[r], s);
                float alpha = __expf(m[r] - mn);  // exp(-inf) = 0 on the first key
                float p = __expf(s - mn);
                l[r] = l[r] * alpha + p;
#pragma unroll
                for (int e = 0; e < VPL * VEC; e++) acc[r][e] = fmaf(p, vf[e], acc[r][e] * alpha);
                m[r] = mn;
            }
        }
    }

    // Merge the NWARPS * KPW key slots of the CTA, then write this split's partial.
    __shared__ float sm_m[NWARPS * KPW][ROWS], sm_l[NWARPS * KPW][ROWS];
    __shared__ float sm_acc[NWARPS * KPW][ROWS][HEAD_DIM];
    const int g = warp * KPW + slot;
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        if (sub == 0) {
            sm_m[g][r] = m[r];
            sm_l[g][r] = l[r];
        }
#pragma unroll
        for (int v = 0; v < VPL; v++) {
            int vi = sub + v * LPK;
            if (vi < NV) {
#pragma unroll
                for (int e = 0; e < VEC; e++) sm_acc[g][r][vi * VEC + e] = acc[r][v * VEC + e];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nrows * HEAD_DIM; idx += blockDim.x) {
        int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float M = NEG_INF;
        for (int s = 0; s < NWARPS * KPW; s++) M = fmaxf(M, sm_m[s][r]);
        float L = 0.f, O = 0.f;
        if (M != NEG_INF) {
            for (int s = 0; s < NWARPS * KPW; s++) {
                float w = __expf(sm_m[s][r] - M);
                L += sm_l[s][r] * w;
                O += sm_acc[s][r][d] * w;
            }
        }
        int rr = row0 + r;
        int qi = rr / group, qh = kvh * group + rr % group;
        long long row = (long long)qh * q_len + qi;
        o_part[(row * splits + split) * HEAD_DIM + d] = O;
        if (d == 0) {
            ml_part[(row * splits + split) * 2] = M;
            ml_part[(row * splits + split) * 2 + 1] = L;
        }
    }
}

// Merges the splits of every row by log-sum-exp and writes the normalised output. Rows below
// extra_rows also merge the CPU's share: a normalised output and its log-sum-exp.
//   out [num_q_heads, q_len, HEAD_DIM] with element strides (o_s0, o_s1, 1)
//   extra_o [extra_rows, HEAD_DIM] f32, extra_lse [extra_rows] f32 (rows = q head * q_len + i),
//   in mapped pinned memory the CPU wrote just before the stream was let through: volatile
//   loads, so no cached copy of an earlier step's rows is ever used.
//   sinks [num_q_heads] f32 or 0: a learned logit per q head (gpt-oss) with no value, which
//   joins the denominator of every row of that head; here, once per row, whatever the splits.
// grid (num_q_heads * q_len), block HEAD_DIM (at most 1024).
extern "C" __global__ void merge_partials(const float* __restrict__ o_part,
                                          const float* __restrict__ ml_part, int splits,
                                          int q_len, T* out, long long o_s0, long long o_s1,
                                          const volatile float* extra_o,
                                          const volatile float* extra_lse, int extra_rows,
                                          const float* __restrict__ sinks) {
    const long long row = blockIdx.x;
    const int d = threadIdx.x;
    const bool extra = row < extra_rows;
    const float e_lse = extra ? extra_lse[row] : NEG_INF;
    const float sink = sinks ? sinks[row / q_len] : NEG_INF;
    float M = fmaxf(e_lse, sink);
    for (int s = 0; s < splits; s++) M = fmaxf(M, ml_part[(row * splits + s) * 2]);
    float L = sink != NEG_INF ? __expf(sink - M) : 0.f, O = 0.f;
    if (extra && e_lse != NEG_INF) {
        float w = __expf(e_lse - M);
        L += w;
        O = extra_o[row * HEAD_DIM + d] * w;
    }
    for (int s = 0; s < splits; s++) {
        float ms = ml_part[(row * splits + s) * 2];
        if (ms == NEG_INF) continue;
        float w = __expf(ms - M);
        L += ml_part[(row * splits + s) * 2 + 1] * w;
        O += o_part[(row * splits + s) * HEAD_DIM + d] * w;
    }
    long long qh = row / q_len, qi = row % q_len;
    out[qh * o_s0 + qi * o_s1 + d] = from_f(O / L);
}

// Writes n tokens of keys and values into their blocks.
//   k, v [heads, n, HEAD_DIM] with element strides (s0, s1, 1), 16-byte aligned rows
// grid ceil(heads * n * NV / 256), block 256. Token t goes to position pos0 + t.
extern "C" __global__ void append_kv(const T* __restrict__ k, long long k_s0, long long k_s1,
                                     const T* __restrict__ v, long long v_s0, long long v_s1,
                                     int heads, int n, long long pos0, const u64* table,
                                     int max_blocks, int block_size) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)heads * n * NV) return;
    int vi = idx % NV;
    long long t = (idx / NV) % n;
    int h = idx / ((long long)NV * n);
    long long pos = pos0 + t;
    const u64* e = table + ((long long)h * max_blocks + pos / block_size) * 2;
    long long off = (pos % block_size) * HEAD_DIM + vi * VEC;
    *(uint4*)((T*)e[0] + off) = *(const uint4*)(k + h * k_s0 + t * k_s1 + vi * VEC);
    *(uint4*)((T*)e[1] + off) = *(const uint4*)(v + h * v_s0 + t * v_s1 + vi * VEC);
}

// Copies positions a..a+n of heads h0..h0+heads out of the blocks.
//   ko [heads, n, HEAD_DIM] with element strides (k_s0, k_s1, 1), 16-byte aligned rows
//   vo [heads, n, HEAD_DIM] with element strides (v_s0, v_s1, 1), 16-byte aligned rows
// grid ceil(heads * n * NV / 256), block 256.
extern "C" __global__ void gather_kv(const u64* table, int max_blocks, int block_size, int h0,
                                     int heads, long long a, int n, T* ko, long long k_s0,
                                     long long k_s1, T* vo, long long v_s0, long long v_s1) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)heads * n * NV) return;
    int vi = idx % NV;
    long long t = (idx / NV) % n;
    int h = idx / ((long long)NV * n);
    long long pos = a + t;
    const u64* e = table + ((long long)(h0 + h) * max_blocks + pos / block_size) * 2;
    long long off = (pos % block_size) * HEAD_DIM + vi * VEC;
    *(uint4*)(ko + h * k_s0 + t * k_s1 + vi * VEC) = *(const uint4*)((const T*)e[0] + off);
    *(uint4*)(vo + h * v_s0 + t * v_s1 + vi * VEC) = *(const uint4*)((const T*)e[1] + off);
}

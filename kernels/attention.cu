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
#define NEG_INF (-__int_as_float(0x7f800000))

// Kv heads 0..heads leave their keys from from[h] on to the CPU (attention over host memory
// computed there at the same time); the kernel reads only the keys before.
#define MAX_CPU_HEADS 16
struct CpuShare {
    int heads;
    int pad;
    long long from[MAX_CPU_HEADS];
};

// Bit 0 of a block's key address in the table marks a host block (mapped pinned memory);
// block addresses are 16-byte aligned, so the bit is free. Every reader masks it off.
#define HOST_BIT 1ull
__device__ __forceinline__ const T* addr(u64 e) { return (const T*)(e & ~HOST_BIT); }

struct KvSrc {
    const u64* table;  // [heads][max_blocks][2], or 0 for dense
    int max_blocks;
    int block_size;
    const T* k;        // dense only
    const T* v;
    long long s0, s1;  // dense only: element strides of head and position
};

// The keys and values of one kv head through a block table or dense strides, the last block's
// addresses kept (the table lives in mapped pinned memory: one read per block, not per key).
// skip_host: keys in host blocks are not read (another reader attends over them).
struct TableRows {
    KvSrc s;
    int h;
    bool skip_host;
    long long bi;
    u64 ek, ev;
    __device__ __forceinline__ void load(long long b) {
        if (b != bi) {
            const u64* e = s.table + ((long long)h * s.max_blocks + b) * 2;
            ek = e[0];
            ev = e[1];
            bi = b;
        }
    }
    // Whether key `pos` is read here; its rows in *k, *v.
    __device__ __forceinline__ bool at(long long pos, const T** k, const T** v) {
        if (!s.table) {
            *k = s.k + h * s.s0 + pos * s.s1;
            *v = s.v + h * s.s0 + pos * s.s1;
            return true;
        }
        load(pos / s.block_size);
        long long off = (pos % s.block_size) * HEAD_DIM;
        *k = addr(ek) + off;
        *v = addr(ev) + off;
        return !(skip_host && (ek & HOST_BIT));
    }
    // The first warp-step start >= jw worth walking (steps wholly inside a skipped host block
    // jumped over; the step's keys lie in jw .. jw + span, and steps advance by `step`).
    __device__ __forceinline__ long long next(long long jw, int span, int step) {
        if (!s.table || !skip_host) return jw;
        load(jw / s.block_size);
        if (!(ek & HOST_BIT)) return jw;
        long long end = (jw / s.block_size + 1) * s.block_size;
        if (end - jw < span) return jw;
        return jw + ((end - jw - span) / step + 1) * step;
    }
};

// Contiguous rows of one kv head from position pos0 on (a staged copy in device memory).
struct FlatRows {
    const T* k;
    const T* v;
    long long pos0;
    __device__ __forceinline__ bool at(long long pos, const T** kr, const T** vr) {
        *kr = k + (pos - pos0) * HEAD_DIM;
        *vr = v + (pos - pos0) * HEAD_DIM;
        return true;
    }
    __device__ __forceinline__ long long next(long long jw, int, int) { return jw; }
};

__device__ __forceinline__ void unpack(const uint4& u, float* f) {
    const T* t = (const T*)&u;
#pragma unroll
    for (int i = 0; i < VEC; i++) f[i] = to_f(t[i]);
}

// One CTA's attention of R query rows (row0.. of kv head kvh's group x q_len rows) over the
// keys ka..kb of `rows`, then the CTA's partial written to slot `slot` of `slots`:
//   o_part [num_q_heads * q_len, slots, HEAD_DIM] f32, unnormalised
//   ml_part [num_q_heads * q_len, slots, 2] f32: running max and sum
// Query i sits at position seq_len - q_len + i; it sees keys j <= pos with pos - j < window
// (window <= 0: no window).
template <int R, class Rows>
__device__ __forceinline__ void attend_cta(const T* __restrict__ q, long long q_s0,
                                           long long q_s1, int q_len, Rows rows,
                                           long long seq_len, long long ka, long long kb,
                                           int kvh, int row0, int group, float scale,
                                           float softcap, int window, int slot, int slots,
                                           float* __restrict__ o_part,
                                           float* __restrict__ ml_part) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kslot = lane / LPK, sub = lane % LPK;  // which key of the warp step, which lane of it
    const int rows_total = group * q_len;
    const int nrows = min(R, rows_total - row0);

    // This lane's slice of every row's query, pre-scaled; each row's position.
    float qf[R][VPL * VEC];
    long long pos[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
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

    float m[R], l[R], acc[R][VPL * VEC];
#pragma unroll
    for (int r = 0; r < R; r++) {
        m[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < VPL * VEC; e++) acc[r][e] = 0.f;
    }

    const int stride = NWARPS * KPW;
    // The loop bound is the same for every lane of a warp (the shuffles below need all 32).
    for (long long jw = ka + warp * KPW; jw < kb; jw += 2 * stride) {
        jw = rows.next(jw, stride + KPW, 2 * stride);
        if (jw >= kb) break;
        const long long j0 = jw + kslot;
        // Two keys per step, both loads issued before any use: more bytes in flight.
        uint4 kv[2][VPL], vv[2][VPL];
        bool have[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            long long j = j0 + u * stride;
            const T *kr, *vr;
            have[u] = j < kb && rows.at(j < kb ? j : ka, &kr, &vr);
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
        float kf[2][VPL * VEC], vf[2][VPL * VEC];
#pragma unroll
        for (int u = 0; u < 2; u++) {
#pragma unroll
            for (int v = 0; v < VPL; v++) {
                unpack(kv[u][v], kf[u] + v * VEC);
                unpack(vv[u][v], vf[u] + v * VEC);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            // Both keys' scores first, then one rescale of the accumulator for the pair.
            float s[2];
            bool vis[2];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                float x = 0.f;
#pragma unroll
                for (int e = 0; e < VPL * VEC; e++) x = fmaf(qf[r][e], kf[u][e], x);
#pragma unroll
                for (int off = LPK / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
                if (softcap > 0.f) x = softcap * tanhf(x / softcap);
                long long j = j0 + u * stride;
                vis[u] = have[u] && r < nrows && j <= pos[r] && (window <= 0 || pos[r] - j < window);
                s[u] = vis[u] ? x : NEG_INF;
            }
            if (!vis[0] && !vis[1]) continue;
            float mn = fmaxf(m[r], fmaxf(s[0], s[1]));
            float alpha = __expf(m[r] - mn);  // exp(-inf) = 0 on the first key
            float p0 = __expf(s[0] - mn), p1 = __expf(s[1] - mn);
            l[r] = l[r] * alpha + p0 + p1;
#pragma unroll
            for (int e = 0; e < VPL * VEC; e++)
                acc[r][e] = fmaf(p1, vf[1][e], fmaf(p0, vf[0][e], acc[r][e] * alpha));
            m[r] = mn;
        }
    }

    // Merge the NWARPS * KPW key slots of the CTA, then write this CTA's partial.
    __shared__ float sm_m[NWARPS * KPW][R], sm_l[NWARPS * KPW][R];
    __shared__ float sm_acc[NWARPS * KPW][R][HEAD_DIM];
    const int g = warp * KPW + kslot;
#pragma unroll
    for (int r = 0; r < R; r++) {
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
        o_part[(row * slots + slot) * HEAD_DIM + d] = O;
        if (d == 0) {
            ml_part[(row * slots + slot) * 2] = M;
            ml_part[(row * slots + slot) * 2 + 1] = L;
        }
    }
}

// Partial attention of up to R query rows over the keys of one split.
//   q        [num_q_heads, q_len, HEAD_DIM] with element strides (q_s0, q_s1, 1)
//   o_part, ml_part: as attend_cta, one slot per split
// grid (splits, num_kv_heads, ceil(group * q_len / R)), block 32 * NWARPS.
// Keys below `lo` are not read (dropped or outside every window); nor, with skip_host, keys in
// host blocks (the copy engine stages them for attend_staged).
template <int R>
__device__ void attend_partial_impl(const T* q, long long q_s0, long long q_s1, int q_len,
                                    KvSrc src, long long seq_len, long long lo,
                                    long long keys_per_split, int group, float scale,
                                    float softcap, int window, CpuShare share, int skip_host,
                                    float* o_part, float* ml_part) {
    const int split = blockIdx.x, kvh = blockIdx.y;
    const long long ka = lo + split * keys_per_split;
    long long kb = min(seq_len, ka + keys_per_split);
    if (kvh < share.heads) kb = min(kb, share.from[kvh]);
    TableRows rows{src, kvh, skip_host != 0, -1, 0, 0};
    attend_cta<R>(q, q_s0, q_s1, q_len, rows, seq_len, ka, kb, kvh, blockIdx.z * R, group,
                  scale, softcap, window, split, gridDim.x, o_part, ml_part);
}

#define ATTEND_PARTIAL(R)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * NWARPS) attend_partial_r##R(          \
        const T* __restrict__ q, long long q_s0, long long q_s1, int q_len, KvSrc src,      \
        long long seq_len, long long lo, long long keys_per_split, int group, float scale,  \
        float softcap, int window, CpuShare share, int skip_host, float* __restrict__ o_part, \
        float* __restrict__ ml_part) {                                                      \
        attend_partial_impl<R>(q, q_s0, q_s1, q_len, src, seq_len, lo, keys_per_split,      \
                               group, scale, softcap, window, share, skip_host, o_part,     \
                               ml_part);                                                    \
    }
ATTEND_PARTIAL(4)
ATTEND_PARTIAL(8)

// Host blocks staged in device memory by the copy engine: each unit is `n` consecutive keys
// of kv head `head` from position `pos` on, rows contiguous at k and v; it is cut into `subs`
// pieces of at most `sub_len` keys, each a CTA writing slot `slot + sub`.
#define MAX_UNITS 48
struct Unit {
    u64 k, v;
    long long pos;
    int n, head, slot, subs;
};
struct Units {
    int count;
    int sub_len;
    Unit u[MAX_UNITS];
};

// Partial attention over staged units.
//   q        [num_q_heads, q_len, HEAD_DIM] with element strides (q_s0, q_s1, 1)
//   o_part, ml_part: as attend_cta, with `slots` slots per row
// grid (units.count, ceil(group * q_len / R), most subs of a unit), block 32 * NWARPS.
template <int R>
__device__ void attend_staged_impl(const T* q, long long q_s0, long long q_s1, int q_len,
                                   long long seq_len, int group, float scale, float softcap,
                                   int window, const Units& units, int slots, float* o_part,
                                   float* ml_part) {
    const Unit& u = units.u[blockIdx.x];
    const int sub = blockIdx.z;
    if (sub >= u.subs) return;
    const long long ka = u.pos + (long long)sub * units.sub_len;
    const long long kb = min(u.pos + u.n, ka + units.sub_len);
    FlatRows rows{(const T*)u.k, (const T*)u.v, u.pos};
    attend_cta<R>(q, q_s0, q_s1, q_len, rows, seq_len, ka, kb, u.head, blockIdx.y * R, group,
                  scale, softcap, window, u.slot + sub, slots, o_part, ml_part);
}

#define ATTEND_STAGED(R)                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * NWARPS) attend_staged_r##R(           \
        const T* __restrict__ q, long long q_s0, long long q_s1, int q_len,                 \
        long long seq_len, int group, float scale, float softcap, int window, Units units,  \
        int slots, float* __restrict__ o_part, float* __restrict__ ml_part) {               \
        attend_staged_impl<R>(q, q_s0, q_s1, q_len, seq_len, group, scale, softcap, window, \
                              units, slots, o_part, ml_part);                               \
    }
ATTEND_STAGED(4)
ATTEND_STAGED(8)

// Merges every partial of each row by log-sum-exp and writes the normalised output: the
// `splits` of attend_partial, the `slots2` of attend_staged (o2/ml2, may be 0; slots no unit
// wrote hold a max of -inf), and, for rows below extra_rows, the CPU's share: a normalised
// output and its log-sum-exp.
//   out [num_q_heads, q_len, HEAD_DIM] with element strides (o_s0, o_s1, 1)
//   extra_o [extra_rows, HEAD_DIM] f32, extra_lse [extra_rows] f32 (rows = q head * q_len + i),
//   in mapped pinned memory the CPU wrote just before the stream was let through: volatile
//   loads, so no cached copy of an earlier step's rows is ever used.
//   sinks [num_q_heads] f32 or 0: a learned logit per q head (gpt-oss) with no value, which
//   joins the denominator of every row of that head; here, once per row, whatever the splits.
// grid (num_q_heads * q_len), block HEAD_DIM (at most 1024).
extern "C" __global__ void merge_partials(const float* __restrict__ o_part,
                                          const float* __restrict__ ml_part, int splits,
                                          const float* __restrict__ o2,
                                          const float* __restrict__ ml2, int slots2,
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
    for (int s = 0; s < slots2; s++) M = fmaxf(M, ml2[(row * slots2 + s) * 2]);
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
    for (int s = 0; s < slots2; s++) {
        float ms = ml2[(row * slots2 + s) * 2];
        if (ms == NEG_INF) continue;
        float w = __expf(ms - M);
        L += ml2[(row * slots2 + s) * 2 + 1] * w;
        O += o2[(row * slots2 + s) * HEAD_DIM + d] * w;
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
    *(uint4*)((T*)addr(e[0]) + off) = *(const uint4*)(k + h * k_s0 + t * k_s1 + vi * VEC);
    *(uint4*)((T*)addr(e[1]) + off) = *(const uint4*)(v + h * v_s0 + t * v_s1 + vi * VEC);
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
    *(uint4*)(ko + h * k_s0 + t * k_s1 + vi * VEC) = *(const uint4*)(addr(e[0]) + off);
    *(uint4*)(vo + h * v_s0 + t * v_s1 + vi * VEC) = *(const uint4*)(addr(e[1]) + off);
}

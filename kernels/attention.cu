// headinfer's GPU kernels, compiled at run time by NVRTC once per (device, dtype, head_dim,
// KV format).
//
// Defines set by the compiler call (src/cuda/kernels.rs):
//   HEAD_DIM   elements per head row
//   ELEM_BF16 | ELEM_F16 | ELEM_F32   the element type T of K, V, Q and the output
//   KV_INT8    (optional) the blocks hold 8-bit rows (below); q, k, v inputs and outputs stay T
//
// KV rows live in blocks of `block_size` tokens, each block `[block_size, ROW_KV]` KV units
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

// What a block row holds. Exact: HEAD_DIM elements of T. KV_INT8 (src/quant.rs writes the same
// bytes on the CPU): ROW_BYTES bytes, HEAD_DIM int8 values, then one bf16 scale (little-endian)
// per group of QGROUP = gcd(HEAD_DIM, 32) values, then zeros up to a multiple of 8. A group
// holds whole VEC-vectors (HEAD_DIM is a multiple of VEC, so QGROUP is), so each lane's VEC
// values share one scale.
#if defined(KV_INT8)
#define QGROUP (HEAD_DIM % 32 == 0 ? 32 : HEAD_DIM % 16 == 0 ? 16 : HEAD_DIM % 8 == 0 ? 8 : 4)
#define NGROUPS (HEAD_DIM / QGROUP)
#define ROW_BYTES ((HEAD_DIM + 2 * NGROUPS + 7) / 8 * 8)
typedef unsigned char KV;
#define ROW_KV ROW_BYTES
static_assert(HEAD_DIM % QGROUP == 0 && QGROUP % VEC == 0, "a group holds whole vectors");
static_assert(QGROUP == Q8_GROUP && ROW_BYTES == Q8_ROW_BYTES, "src/quant.rs's row layout");
#else
typedef T KV;
#define ROW_KV HEAD_DIM
#endif

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
__device__ __forceinline__ const KV* addr(u64 e) { return (const KV*)(e & ~HOST_BIT); }

struct KvSrc {
    const u64* table;  // [heads][max_blocks][2], or 0 for dense
    int max_blocks;
    int block_size;
    const KV* k;       // dense only (the rate probe's buffers; KV lives in blocks)
    const KV* v;
    long long s0, s1;  // dense only: strides of head and position in KV (int8: bytes)
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
    __device__ __forceinline__ bool at(long long pos, const KV** k, const KV** v) {
        if (!s.table) {
            *k = s.k + h * s.s0 + pos * s.s1;
            *v = s.v + h * s.s0 + pos * s.s1;
            return true;
        }
        load(pos / s.block_size);
        long long off = (pos % s.block_size) * ROW_KV;
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
    const KV* k;
    const KV* v;
    long long pos0;
    __device__ __forceinline__ bool at(long long pos, const KV** kr, const KV** vr) {
        *kr = k + (pos - pos0) * ROW_KV;
        *vr = v + (pos - pos0) * ROW_KV;
        return true;
    }
    __device__ __forceinline__ long long next(long long jw, int, int) { return jw; }
};

__device__ __forceinline__ void unpack(const uint4& u, float* f) {
    const T* t = (const T*)&u;
#pragma unroll
    for (int i = 0; i < VEC; i++) f[i] = to_f(t[i]);
}

// One lane's load of a block row: the VEC values of vector `vi`. Exact: one 16-byte vector of
// T. KV_INT8: VEC int8 values (8 or 4 bytes, aligned: ROW_BYTES is a multiple of 8 and VEC
// divides vi * VEC) and their group's scale, dequantized in registers by unpack_kv.
#if defined(KV_INT8)
#if defined(ELEM_F32)
typedef unsigned QBits;  // VEC = 4 values
#else
typedef uint2 QBits;  // VEC = 8 values
#endif
struct Packed {
    QBits q;
    u16 s;
};
__device__ __forceinline__ Packed load_kv(const KV* row, int vi) {
    Packed p;
    p.q = *(const QBits*)(row + vi * VEC);
    p.s = *(const u16*)(row + HEAD_DIM + 2 * (vi * VEC / QGROUP));
    return p;
}
__device__ __forceinline__ Packed zero_kv() {
    Packed p;
    p.q = QBits{};
    p.s = 0;
    return p;
}
__device__ __forceinline__ unsigned qword(const unsigned& q, int) { return q; }
__device__ __forceinline__ unsigned qword(const uint2& q, int i) { return i == 0 ? q.x : q.y; }
// Value = (float)q * (float)scale: exact in f32 (7 + 8 significant bits), so every reader that
// dequantizes gets the same floats.
__device__ __forceinline__ void unpack_kv(const Packed& p, float* f) {
    const float s = __uint_as_float(((unsigned)p.s) << 16);
#pragma unroll
    for (int i = 0; i < VEC; i++) {
        const int b = (int)(qword(p.q, i / 4) << (24 - 8 * (i % 4))) >> 24;  // sign-extended
        f[i] = (float)b * s;
    }
}
#else
typedef uint4 Packed;
__device__ __forceinline__ Packed load_kv(const KV* row, int vi) {
    return *(const uint4*)(row + vi * VEC);
}
__device__ __forceinline__ Packed zero_kv() { return make_uint4(0, 0, 0, 0); }
__device__ __forceinline__ void unpack_kv(const Packed& p, float* f) { unpack(p, f); }
#endif

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
        Packed kv[2][VPL], vv[2][VPL];
        bool have[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            long long j = j0 + u * stride;
            const KV *kr, *vr;
            have[u] = j < kb && rows.at(j < kb ? j : ka, &kr, &vr);
#pragma unroll
            for (int v = 0; v < VPL; v++) {
                int vi = sub + v * LPK;
                if (have[u] && vi < NV) {
                    kv[u][v] = load_kv(kr, vi);
                    vv[u][v] = load_kv(vr, vi);
                } else {
                    kv[u][v] = zero_kv();
                    vv[u][v] = zero_kv();
                }
            }
        }
        float kf[2][VPL * VEC], vf[2][VPL * VEC];
#pragma unroll
        for (int u = 0; u < 2; u++) {
#pragma unroll
            for (int v = 0; v < VPL; v++) {
                unpack_kv(kv[u][v], kf[u] + v * VEC);
                unpack_kv(vv[u][v], vf[u] + v * VEC);
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
// of kv head `head` from position `pos` on, rows (of ROW_KV) contiguous at k and v; it is cut
// into `subs` pieces of at most `sub_len` keys, each a CTA writing slot `slot + sub`.
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
    FlatRows rows{(const KV*)u.k, (const KV*)u.v, u.pos};
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

#if defined(KV_INT8)
// Quantizes the QGROUP values at x (16-byte aligned) into the int8 bytes at q (4-byte aligned)
// and returns their scale's bf16 bits, by src/quant.rs's rule (the CPU's bytes are the same):
// a non-finite value makes the scale NaN; otherwise scale = amax / 127 rounded up to bf16 (so
// that |x| / scale <= 127; 0 for an all-zero group, or one so small that amax / 127 underflows);
// q = 0 where the scale is NaN or 0, else clamp(rint(x / scale), -127, 127). The divisions are
// IEEE (__fdiv_rn, whatever the flags) and the rounding ties to even, so the bytes do not
// depend on the compiler's choices.
__device__ __forceinline__ u16 quantize_group(const T* x, KV* q) {
    float f[QGROUP];
#pragma unroll
    for (int i = 0; i < QGROUP / VEC; i++) unpack(*(const uint4*)(x + i * VEC), f + i * VEC);
    float amax = 0.f;
    bool finite = true;
#pragma unroll
    for (int i = 0; i < QGROUP; i++) {
        finite &= (__float_as_uint(f[i]) & 0x7f800000u) != 0x7f800000u;
        amax = fmaxf(amax, fabsf(f[i]));
    }
    unsigned s = 0x7fc00000u;  // the scale as f32 bits, low half zero
    if (finite) {
        s = __float_as_uint(__fdiv_rn(amax, 127.f));
        if (s & 0xffffu) s += 0x10000u;  // round up: never a larger |q| than 127
        s &= 0xffff0000u;
    }
    const bool zero = s == 0u || s == 0x7fc00000u;
    const float sf = __uint_as_float(s);
#pragma unroll
    for (int i = 0; i < QGROUP; i += 4) {
        unsigned w = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int b = zero ? 0 : max(-127, min(127, __float2int_rn(__fdiv_rn(f[i + e], sf))));
            w |= ((unsigned)b & 0xffu) << (8 * e);
        }
        *(unsigned*)(q + i) = w;
    }
    return (u16)(s >> 16);
}

// Writes n tokens of keys and values into their blocks, quantized: one thread per group of
// QGROUP values of a key row and of a value row; group 0's thread also zeroes the row's tail.
//   k, v [heads, n, HEAD_DIM] with element strides (s0, s1, 1), 16-byte aligned rows
// grid ceil(heads * n * NGROUPS / 256), block 256. Token t goes to position pos0 + t.
extern "C" __global__ void append_kv(const T* __restrict__ k, long long k_s0, long long k_s1,
                                     const T* __restrict__ v, long long v_s0, long long v_s1,
                                     int heads, int n, long long pos0, const u64* table,
                                     int max_blocks, int block_size) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)heads * n * NGROUPS) return;
    int g = idx % NGROUPS;
    long long t = (idx / NGROUPS) % n;
    int h = idx / ((long long)NGROUPS * n);
    long long pos = pos0 + t;
    const u64* e = table + ((long long)h * max_blocks + pos / block_size) * 2;
    long long off = (pos % block_size) * ROW_BYTES;
    KV* kr = (KV*)addr(e[0]) + off;
    KV* vr = (KV*)addr(e[1]) + off;
    const T* kx = k + h * k_s0 + t * k_s1 + g * QGROUP;
    const T* vx = v + h * v_s0 + t * v_s1 + g * QGROUP;
    ((u16*)(kr + HEAD_DIM))[g] = quantize_group(kx, kr + g * QGROUP);
    ((u16*)(vr + HEAD_DIM))[g] = quantize_group(vx, vr + g * QGROUP);
    if (g == 0) {
#pragma unroll
        for (int i = HEAD_DIM + 2 * NGROUPS; i < ROW_BYTES; i++) {
            kr[i] = 0;
            vr[i] = 0;
        }
    }
}

// Positions a..a+n of heads h0..h0+heads out of the blocks, dequantized into T (each value
// (float)q * (float)scale, rounded to T as every other output is).
//   ko [heads, n, HEAD_DIM] with element strides (k_s0, k_s1, 1), 16-byte aligned rows
//   vo [heads, n, HEAD_DIM] with element strides (v_s0, v_s1, 1), 16-byte aligned rows
// grid ceil(heads * n * NV / 256), block 256.
__device__ __forceinline__ uint4 dequantize_vec(const Packed& p) {
    float f[VEC];
    unpack_kv(p, f);
    uint4 u;
    T* t = (T*)&u;
#pragma unroll
    for (int i = 0; i < VEC; i++) t[i] = from_f(f[i]);
    return u;
}
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
    long long off = (pos % block_size) * ROW_BYTES;
    *(uint4*)(ko + h * k_s0 + t * k_s1 + vi * VEC) = dequantize_vec(load_kv(addr(e[0]) + off, vi));
    *(uint4*)(vo + h * v_s0 + t * v_s1 + vi * VEC) = dequantize_vec(load_kv(addr(e[1]) + off, vi));
}

// The prefill's gather through the copy engine: a staged piece's units (each `n` rows of head
// `head` from position `pos` on, keys at k and values at v, ROW_BYTES apart) dequantized into
// rows pos - a.. of ko and vo (as gather_kv's, head relative to the gather's first).
// grid (units.count, ceil(most rows of a unit * NV / 256)), block 256.
extern "C" __global__ void dequant_staged(Units units, long long a, T* ko, long long k_s0,
                                          long long k_s1, T* vo, long long v_s0,
                                          long long v_s1) {
    const Unit& u = units.u[blockIdx.x];
    long long idx = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (idx >= (long long)u.n * NV) return;
    int vi = idx % NV;
    long long t = idx / NV;
    long long o = u.pos - a + t;
    long long off = t * ROW_BYTES;
    *(uint4*)(ko + u.head * k_s0 + o * k_s1 + vi * VEC) =
        dequantize_vec(load_kv((const KV*)u.k + off, vi));
    *(uint4*)(vo + u.head * v_s0 + o * v_s1 + vi * VEC) =
        dequantize_vec(load_kv((const KV*)u.v + off, vi));
}
#else
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
#endif

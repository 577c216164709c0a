/*
 * common.cuh - pieces shared by the CUDA kernels of segflex: the view of one
 * sequence's segment table, the exact classification of a rectangle of
 * (query, key) positions, and thin wrappers over the warp-level matrix
 * instructions (mma.sync m16n8k16, ldmatrix) and asynchronous copies.
 */
#ifndef SEGFLEX_CUDA_COMMON_CUH
#define SEGFLEX_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include "segflex.h"

namespace sfcuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/* One sequence's segment table. Positions at or past `length` belong to an
 * implicit trailing GLOBAL segment with index n and bias 0. */
struct SegView {
    const int32_t *end;
    const uint8_t *kind;
    const float *bias; /* may be null */
    int n;
    int length;

    /* Index of the segment that holds position p (n for the implicit tail). */
    __device__ __forceinline__ int seg(int p) const
    {
        if (p >= length) return n;
        int lo = 0, hi = n - 1; /* first s with end[s] > p; exists since p < length */
        while (lo < hi) {
            int mid = (lo + hi) >> 1;
            if (end[mid] > p) hi = mid;
            else lo = mid + 1;
        }
        return lo;
    }
    __device__ __forceinline__ int kind_of(int s) const { return s >= n ? SF_GLOBAL : (int)kind[s]; }
    __device__ __forceinline__ float bias_of(int s) const
    {
        return (s >= n || bias == nullptr) ? 0.f : bias[s];
    }
    __device__ __forceinline__ int end_of(int s) const { return s >= n ? INT_MAX : end[s]; }
};

/* The view of sequence b of a batch of tables living in device memory. */
__device__ __forceinline__ SegView make_view(const int32_t *seg_ptr, const int32_t *seg_end,
                                             const uint8_t *seg_kind, const float *seg_bias, int b)
{
    SegView v;
    if (seg_ptr == nullptr) { /* no table: everything is the global tail */
        v.end = nullptr; v.kind = nullptr; v.bias = nullptr; v.n = 0; v.length = 0;
        return v;
    }
    int s0 = seg_ptr[b], s1 = seg_ptr[b + 1];
    v.end = seg_end + s0;
    v.kind = seg_kind + s0;
    v.bias = seg_bias ? seg_bias + s0 : nullptr;
    v.n = s1 - s0;
    v.length = v.n > 0 ? v.end[v.n - 1] : 0;
    return v;
}

/*
 * Exact relation of the rectangle queries [p0, p1] x keys [k0, k1] (inclusive
 * positions) to the mask: SF_BLOCK_EMPTY, SF_BLOCK_PARTIAL or SF_BLOCK_FULL.
 * `needs_bias` is set when some query of the rectangle is global and some key
 * segment touched carries a non-zero bias. Cost: the segments the rectangle
 * touches (at most its side lengths, since every segment holds a token).
 */
__device__ __forceinline__ int classify_rect(const SegView &v, int p0, int p1, int k0, int k1,
                                             bool *needs_bias)
{
    *needs_bias = false;
    const int kend = min(k1, p1); /* keys past the last query are never seen */
    if (k0 > kend) return SF_BLOCK_EMPTY;
    const int sq0 = v.seg(p0), sq1 = v.seg(p1);
    const int ks0 = v.seg(k0), ks1 = v.seg(k1), kse = v.seg(kend);

    int last_global_q = -1; /* last query position in a global segment */
    int ngq_first = -1;     /* first non-global query segment */
    bool ngq_many = false;
    for (int s = sq0; s <= sq1; ++s) {
        if (v.kind_of(s) == SF_GLOBAL) {
            last_global_q = min(v.end_of(s) - 1, p1);
        } else if (ngq_first < 0) {
            ngq_first = s;
        } else {
            ngq_many = true;
        }
    }
    bool shared_seen = false; /* a shared key at or before the last query */
    int ns_first = -1;        /* first non-shared key segment */
    bool ns_many = false, any_bias = false;
    for (int s = ks0; s <= ks1; ++s) {
        if (v.kind_of(s) == SF_SHARED) {
            if (s <= kse) shared_seen = true;
        } else if (ns_first < 0) {
            ns_first = s;
        } else {
            ns_many = true;
        }
        if (v.bias_of(s) != 0.f) any_bias = true;
    }
    /* A pair exists iff: a global query at or after k0, or a shared key before
     * the last query, or a key segment that also holds queries. */
    const bool nonempty = last_global_q >= k0 || shared_seen || (kse >= sq0 && ks0 <= sq1);
    if (!nonempty) return SF_BLOCK_EMPTY;
    *needs_bias = last_global_q >= 0 && any_bias;
    if (k1 > p0) return SF_BLOCK_PARTIAL; /* not every key precedes every query */
    const bool seg_full = ns_first < 0 || ngq_first < 0 ||
                          (!ns_many && !ngq_many && ns_first == ngq_first);
    return seg_full ? SF_BLOCK_FULL : SF_BLOCK_PARTIAL;
}

/* ------------------------------------------------------ matrix instructions */

template <typename T> struct Pack2;
template <> struct Pack2<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float a, float b)
    {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};
template <> struct Pack2<__half> {
    static __device__ __forceinline__ uint32_t pack(float a, float b)
    {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};

/* d += a * b, m16n8k16, fp32 accumulators. */
template <typename T>
__device__ __forceinline__ void mma16816(float *d, const uint32_t *a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float *d, const uint32_t *a, uint32_t b0,
                                                        uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float *d, const uint32_t *a, uint32_t b0,
                                                 uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ uint32_t smem_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16-byte asynchronous copy; copies nothing and writes zeros when !valid
 * (the source address is then not read). */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid)
{
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/*
 * Shared-memory tiles of ROWS x D 16-bit elements, 16-byte chunks XOR-swizzled
 * by the row so that the 8 rows an ldmatrix reads fall in distinct banks.
 */
template <int D>
__device__ __forceinline__ uint32_t tile_off(int row, int chunk)
{
    return (uint32_t)(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

/* Copies rows [0, ROWS) of a tile from global rows base + r*stride (r < valid_rows)
 * into a swizzled shared tile; rows past valid_rows become zeros. Each thread keeps one
 * 16-byte column and steps down the rows, so an address costs one 64-bit add. */
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t s_tile, const uint16_t *base, int64_t stride,
                                          int valid_rows, int tid)
{
    constexpr int CHUNKS = D / 8;
    constexpr int RSTEP = THREADS / CHUNKS; /* rows between a thread's copies */
    static_assert(THREADS % CHUNKS == 0 && RSTEP % 8 == 0 && ROWS % RSTEP == 0,
                  "the swizzle phase must be the same for all rows of a thread");
    const int row0 = tid / CHUNKS, chunk = tid % CHUNKS;
    const uint16_t *src = base + row0 * stride + chunk * 8;
    const int64_t step = RSTEP * stride;
    const uint32_t dst = s_tile + tile_off<D>(row0, chunk);
#pragma unroll
    for (int i = 0; i < ROWS / RSTEP; ++i) {
        const bool ok = row0 + i * RSTEP < valid_rows;
        cp_async16(dst + i * (RSTEP * D * 2), ok ? src : base, ok);
        src += step;
    }
}

/* 2^x on the special-function unit (one instruction; 2^-inf = 0; denormals flush to 0,
 * far below what a bf16/fp16 probability can hold). */
__device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float quad_max(float x)
{
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x)
{
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

/* Host-side checks shared by the entry points. */
inline bool aligned16(const sf_tensor &t)
{
    return ((uintptr_t)t.data % 16) == 0 && t.stride_b % 8 == 0 && t.stride_h % 8 == 0 &&
           t.stride_t % 8 == 0;
}

inline sf_status last_launch_status()
{
    return cudaGetLastError() == cudaSuccess ? SF_OK : SF_ERR_CUDA;
}

} // namespace sfcuda

#endif

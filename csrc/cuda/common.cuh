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

/* Where sequence b's segments lie in a batch of tables: [s0, s1), loaded with no use yet,
 * so that the caller can issue them with its other first loads (table: false without one). */
struct SegRange {
    int s0, s1;
    bool table;
};
__device__ __forceinline__ SegRange load_seg_range(const int32_t *seg_ptr, int b)
{
    SegRange r{0, 0, seg_ptr != nullptr};
    if (r.table) {
        r.s0 = seg_ptr[b];
        r.s1 = seg_ptr[b + 1];
    }
    return r;
}

/* The view of the segments [s0, s1) of a batch of tables living in device memory. */
__device__ __forceinline__ SegView view_of_range(const int32_t *seg_end, const uint8_t *seg_kind,
                                                 const float *seg_bias, const SegRange &r)
{
    SegView v;
    if (!r.table) { /* no table: everything is the global tail */
        v.end = nullptr; v.kind = nullptr; v.bias = nullptr; v.n = 0; v.length = 0;
        return v;
    }
    v.end = seg_end + r.s0;
    v.kind = seg_kind + r.s0;
    v.bias = seg_bias ? seg_bias + r.s0 : nullptr;
    v.n = r.s1 - r.s0;
    v.length = v.n > 0 ? v.end[v.n - 1] : 0;
    return v;
}

/* The view of sequence b of a batch of tables living in device memory. */
__device__ __forceinline__ SegView make_view(const int32_t *seg_ptr, const int32_t *seg_end,
                                             const uint8_t *seg_kind, const float *seg_bias, int b)
{
    return view_of_range(seg_end, seg_kind, seg_bias, load_seg_range(seg_ptr, b));
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

/* The two specialisations differ only in the element type named in the instruction. */
#define SF_MMA16816(CTYPE, PTXTYPE)                                                              \
    template <>                                                                                  \
    __device__ __forceinline__ void mma16816<CTYPE>(float *d, const uint32_t *a, uint32_t b0,    \
                                                    uint32_t b1)                                 \
    {                                                                                            \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTXTYPE "." PTXTYPE                \
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"              \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                            \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));            \
    }
SF_MMA16816(__nv_bfloat16, "bf16")
SF_MMA16816(__half, "f16")
#undef SF_MMA16816

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

/* Transposes an 8x8 matrix of 16-bit elements held in mma fragment layout (lane 4g + c
 * holds row g, columns 2c and 2c + 1): afterwards the lane holds row g of the transpose. */
__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x)
{
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
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

/* Programmatic dependent launch (sm_90; see launch_dependent below): wait until the writes of
 * the stream's previous kernel are visible, and let the next kernel be scheduled. Older
 * devices run a stream's kernels one after the other, so both are no-ops there. */
__device__ __forceinline__ void grid_dependency_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dependents_launch()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* mbarriers in shared memory (sm_90), addressed by their shared-space address. A fresh
 * barrier is in phase 0; a phase completes when its count of arrivals (and of announced
 * copy bytes) is in. */
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

/* A plain arrival (release: this thread's earlier shared-memory writes are visible to the
 * threads that wait for the phase). */
__device__ __forceinline__ void mbar_arrive(uint32_t bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

/* Spins until the phase with the given parity has completed (acquire: the copied bytes and
 * the writes released by the arrivals are visible afterwards). */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity)
{
    uint32_t done;
    do {
        asm volatile("{\n\t.reg .pred p;\n\t"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                     "selp.u32 %0, 1, 0, p;\n\t}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
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
 * 16-byte column and steps down the rows, so an address costs one 64-bit add.
 * With SOME_ROWS, only the rows of the 16-row groups whose bit is set in `groups` are
 * copied (group r / 16 of row r); the others are left as they are. */
template <int ROWS, int D, int THREADS, bool SOME_ROWS = false>
__device__ __forceinline__ void load_tile(uint32_t s_tile, const uint16_t *base, int64_t stride,
                                          int valid_rows, int tid, unsigned groups = 0)
{
    constexpr int CHUNKS = D / 8;
    constexpr int RSTEP = THREADS / CHUNKS; /* rows between a thread's copies */
    static_assert(THREADS % CHUNKS == 0 && RSTEP % 8 == 0 && ROWS % RSTEP == 0,
                  "the swizzle phase must be the same for all rows of a thread");
    static_assert(!SOME_ROWS || RSTEP <= 16, "a copy's row group is known at compile time");
    const int row0 = tid / CHUNKS, chunk = tid % CHUNKS;
    const uint16_t *src = base + row0 * stride + chunk * 8;
    const int64_t step = RSTEP * stride;
    const uint32_t dst = s_tile + tile_off<D>(row0, chunk);
#pragma unroll
    for (int i = 0; i < ROWS / RSTEP; ++i) {
        /* row0 < RSTEP <= 16: copy i's row lies in group i * RSTEP / 16 */
        if (!SOME_ROWS || ((groups >> (i * RSTEP / 16)) & 1u)) {
            const bool ok = row0 + i * RSTEP < valid_rows;
            cp_async16(dst + i * (RSTEP * D * 2), ok ? src : base, ok);
        }
        src += step;
    }
}

/* A load of global memory issued where it is written: the compiler would sink a plain load
 * past an early exit, one trip to memory after the load that decides the exit. */
__device__ __forceinline__ int load_now(const int32_t *p)
{
    int v;
    asm volatile("{\n .reg .u64 ga;\n cvta.to.global.u64 ga, %1;\n ld.global.b32 %0, [ga];\n}\n"
                 : "=r"(v)
                 : "l"(p));
    return v;
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
/* One online-softmax step (base 2) for row r of a thread's m16n8 accumulator fragments
 * s[NB][4] (the row's elements are 2r and 2r + 1 of each): given the row's maximum over
 * this tile (reduced over the quad of lanes sharing the row), moves the running maximum m,
 * turns the scores into exponentials relative to it, and rescales the running sum l;
 * alpha is the factor the row's output accumulators must be scaled by. A row that has seen
 * only masked keys (-inf) keeps zeros. */
template <int NB>
__device__ __forceinline__ void online_softmax_row(float (&s)[NB][4], int r, float mx, float &m,
                                                   float &l, float &alpha)
{
    float m_new = fmaxf(m, mx);
    float base = m_new == -INFINITY ? 0.f : m_new;
    alpha = fast_exp2(m - base);
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < NB; ++n) {
        s[n][2 * r] = fast_exp2(s[n][2 * r] - base);
        s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
    }
    l = l * alpha + sum;
    m = m_new;
}

__device__ __forceinline__ float quad_sum(float x)
{
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

/* ------------------------------------------------------- the kernels' arguments */

/* What every attention kernel reads (sf_seqs, the tensors as 16-bit elements with their
 * strides in elements, the optional lse), passed by value as the kernel argument. */
struct AttnArgs {
    const int32_t *seg_ptr, *seg_end;
    const uint8_t *seg_kind;
    const float *seg_bias;
    const int32_t *q_start, *q_len, *k_start, *kv_len;
    const uint16_t *q, *k, *v;
    uint16_t *out;
    int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, o_sb, o_sh, o_st;
    float *lse;
    int64_t lse_sb, lse_sh;
    int group; /* heads_q / heads_kv */
    float scale_log2;
};

/* The current device's SM count, and whether it is compute capability 9.0 (the Hopper
 * kernels are built for sm_90a only); cached per device. Returns 0 when it cannot be read. */
inline int device_sms(bool *sm90)
{
    static int info[64]; /* per device: 0 unknown, else 2 * SM count + (sm_90 ? 1 : 0) */
    int dev = 0;
    *sm90 = false;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    int *slot = &info[dev & 63];
    int known = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (known == 0) {
        int major = 0, minor = 0, sms = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
            sms <= 0) {
            cudaGetLastError();
            return 0;
        }
        known = 2 * sms + (major == 9 && minor == 0 ? 1 : 0);
        __atomic_store_n(slot, known, __ATOMIC_RELEASE);
    }
    *sm90 = (known & 1) != 0;
    return known >> 1;
}

inline bool aligned16(const sf_tensor &t)
{
    return ((uintptr_t)t.data % 16) == 0 && t.stride_b % 8 == 0 && t.stride_h % 8 == 0 &&
           t.stride_t % 8 == 0;
}

/* The checks the CUDA entry points share. SF_OK with *nothing set: no row to compute. */
inline sf_status check_call(const sf_layouts *layouts, const sf_seqs *seqs,
                            const sf_attn_params *params, const sf_tensor &q, const sf_tensor &k,
                            const sf_tensor &v, const sf_tensor &out, bool *nothing)
{
    *nothing = false;
    if (seqs == nullptr || params == nullptr) return SF_ERR_ARGUMENT;
    if (params->dtype != SF_BFLOAT16 && params->dtype != SF_FLOAT16) return SF_ERR_DTYPE;
    if (params->head_dim != 64 && params->head_dim != 128) return SF_ERR_HEAD_DIM;
    if (params->heads_q <= 0 || params->heads_kv <= 0 || params->heads_q % params->heads_kv != 0)
        return SF_ERR_ARGUMENT;
    if (seqs->batch < 0 || seqs->max_q_len < 0) return SF_ERR_ARGUMENT;
    if (layouts != nullptr && layouts->batch != seqs->batch) return SF_ERR_LAYOUT;
    if (seqs->batch == 0 || seqs->max_q_len == 0) {
        *nothing = true;
        return SF_OK;
    }
    if (!q.data || !k.data || !v.data || !out.data || !seqs->q_start || !seqs->q_len ||
        !seqs->k_start || !seqs->kv_len)
        return SF_ERR_ARGUMENT;
    if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out)) return SF_ERR_ARGUMENT;
    if (seqs->batch > 65535) return SF_ERR_ARGUMENT; /* the grid's z extent */
    return SF_OK;
}

/* Fills the fields every argument block has (AttnArgs' names; the decode kernels' block
 * adds its own) from a checked call. */
template <typename Args>
inline void pack_args(Args &a, const sf_layouts *layouts, const sf_seqs *seqs,
                      const sf_attn_params *params, const sf_tensor &q, const sf_tensor &k,
                      const sf_tensor &v, const sf_tensor &out, float *lse, int64_t lse_sb,
                      int64_t lse_sh)
{
    a.seg_ptr = layouts ? layouts->seg_ptr : nullptr;
    a.seg_end = layouts ? layouts->seg_end : nullptr;
    a.seg_kind = layouts ? layouts->seg_kind : nullptr;
    a.seg_bias = layouts ? layouts->seg_bias : nullptr;
    a.q_start = seqs->q_start;
    a.q_len = seqs->q_len;
    a.k_start = seqs->k_start;
    a.kv_len = seqs->kv_len;
    a.q = (const uint16_t *)q.data;
    a.k = (const uint16_t *)k.data;
    a.v = (const uint16_t *)v.data;
    a.out = (uint16_t *)out.data;
    a.q_sb = q.stride_b; a.q_sh = q.stride_h; a.q_st = q.stride_t;
    a.k_sb = k.stride_b; a.k_sh = k.stride_h; a.k_st = k.stride_t;
    a.v_sb = v.stride_b; a.v_sh = v.stride_h; a.v_st = v.stride_t;
    a.o_sb = out.stride_b; a.o_sh = out.stride_h; a.o_st = out.stride_t;
    a.lse = lse;
    a.lse_sb = lse_sb;
    a.lse_sh = lse_sh;
    a.group = params->heads_q / params->heads_kv;
    a.scale_log2 = params->scale * kLog2e;
}

/* Lets `kernel` use `bytes` of dynamic shared memory and, with max_carveout, asks for the
 * largest shared-memory carveout (so that as many blocks fit in an SM as the shared memory
 * allows; otherwise the driver picks it). Host-side settings, legal while a graph is being
 * captured, but made once per device, eagerly, on the first call: `done` is the caller's set
 * of devices (one bit each) already configured. */
inline bool configure_once(const void *kernel, int bytes, unsigned long long *done,
                           bool max_carveout = false)
{
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    const unsigned long long bit = 1ull << (dev & 63);
    if (__atomic_load_n(done, __ATOMIC_ACQUIRE) & bit) return true;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) !=
            cudaSuccess ||
        (max_carveout &&
         cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                              cudaSharedmemCarveoutMaxShared) != cudaSuccess))
        return false;
    __atomic_fetch_or(done, bit, __ATOMIC_RELEASE);
    return true;
}

inline sf_status last_launch_status()
{
    return cudaGetLastError() == cudaSuccess ? SF_OK : SF_ERR_CUDA;
}

/* Launches kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent of the
 * stream's previous kernel: it is scheduled while that one drains, so the kernel must wait
 * in griddepcontrol.wait before it reads anything the previous kernel wrote. Where such a
 * launch is refused, a plain one (as correct, a little later). */
template <typename... Params, typename... Args>
inline sf_status launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, int smem,
                                  cudaStream_t stream, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaLaunchKernelEx(&cfg, kernel, args...) != cudaSuccess) {
        cudaGetLastError();
        kernel<<<grid, block, smem, stream>>>(args...);
    }
    return last_launch_status();
}

} // namespace sfcuda

#endif

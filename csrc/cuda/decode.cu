/*
 * decode.cu - attention of a few new tokens against a KV cache (sf_cuda_decode).
 *
 * Memory-bound: the job is to stream K and V once at full bandwidth. A block
 * takes one KV head of one sequence and one slice of its keys (split-KV), and
 * all query rows that read that KV head: the G = heads_q / heads_kv query
 * heads times the new tokens, so each K/V byte is read once. Tiles of 64 keys
 * arrive through a 3-stage cp.async pipeline; the 4 warps share the tiles,
 * each warp owning 16 rows and a share of the keys, and run Q K^T and P V on
 * mma.sync (rows padded to 16: tensor-core time is free here). The warps'
 * partial softmax states are merged in shared memory; with several splits a
 * second kernel merges the splits (log-sum-exp weighted).
 *
 * The number of splits depends only on the batch, the heads and the chip (and
 * on how much workspace the caller gives), never on the cache lengths, which
 * live on the device: a captured CUDA graph replays correctly when they change.
 * Keys at or past kv_len are never read.
 *
 * This file holds that first implementation and the entry points; decode_tma.cuh holds the
 * second (copy-engine tile loads, splits merged by the last block, no second kernel). By
 * default each call takes the one that measured faster for its shape (decode_impl below);
 * SEGFLEX_DECODE_IMPL=old / =new force one, for A/B runs; the old one also serves caches a
 * tensor map cannot describe. Policy below says how keys are split.
 */
#include "key_split.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

namespace sfcuda {
namespace {

constexpr int BN = 64;
constexpr int THREADS = 128;
/* Pipeline depth and the fewest tiles per split: build-time constants (-D...) so that an A/B
 * run can rebuild with other values; the defaults are the measured choice (Policy below). */
#ifndef SEGFLEX_DECODE_STAGES
#define SEGFLEX_DECODE_STAGES 3
#endif
#ifndef SEGFLEX_DECODE_MIN_TILES
#define SEGFLEX_DECODE_MIN_TILES 2
#endif
#ifndef SEGFLEX_DECODE_WHOLE_TILES
#define SEGFLEX_DECODE_WHOLE_TILES 4
#endif
constexpr int NSTAGE = SEGFLEX_DECODE_STAGES;
static_assert(NSTAGE >= 2 && NSTAGE <= 6, "the pipeline fits in shared memory");
constexpr int ROWS_PER_BLOCK = 64; /* 4 warps x 16 rows */
constexpr int MAX_SPLITS = 64;
constexpr int SEG_CAP = 1024;

struct DecodeArgs {
    const int32_t *seg_ptr, *seg_end;
    const uint8_t *seg_kind;
    const float *seg_bias;
    const int32_t *q_start, *q_len, *k_start, *kv_len;
    const uint16_t *q, *k, *v;
    uint16_t *out;
    int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, o_sb, o_sh, o_st;
    float *lse;
    int64_t lse_sb, lse_sh;
    float *part_o;   /* [batch, heads_q, max_q, nsplit, D] */
    float *part_lse; /* [batch, heads_q, max_q, nsplit] */
    int heads_q, group, max_q, nsplit, row_chunks;
    int ctr_base;   /* first arrival counter of this launch (splits merged in the kernel) */
    float scale_log2;
};

template <int D> __host__ __device__ constexpr int pipe_bytes() { return NSTAGE * (2 * BN * D * 2 + BN * 4); }
template <int D> __host__ __device__ constexpr int smem_bytes()
{
    return (pipe_bytes<D>() > merge_warps_bytes<D>() ? pipe_bytes<D>() : merge_warps_bytes<D>()) +
           SEG_CAP * 8;
}

/* ------------------------------------------------- splits merged by the last block */

/* Arrival counters: one int per row group (batch x kv head x row chunk) of a launch.
 * Launches take consecutive slices of the pool, so launches in flight at the same time on
 * different streams use different counters. The array starts at zero and the merging block
 * sets its counter back to zero, so each launch, and each replay of a captured graph,
 * finds its counters at zero. */
constexpr int TM_POOL = 16384;
__device__ int g_arrivals[TM_POOL];

/* The weights of a row's splits, over one warp: lane s holds the log-sum-exps of splits s
 * (l0) and s + 32 (l1), -inf for none. Gives their maximum mx, the lane's two weights
 * exp(l - mx) (0 for an empty split) and the weights' total. */
__device__ __forceinline__ void split_weights(float l0, float l1, float &mx, float &w0, float &w1,
                                              float &sum)
{
    mx = fmaxf(l0, l1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    w0 = (mx == -INFINITY || l0 == -INFINITY) ? 0.f : __expf(l0 - mx);
    w1 = (mx == -INFINITY || l1 == -INFINITY) ? 0.f : __expf(l1 - mx);
    sum = w0 + w1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
}

/* The output row (b, h, t) of a merge: lane `lane` holds E of its values, summed with the
 * splits' weights (sum: their total, mx: the maximum they are relative to); written
 * normalised, with the row's log-sum-exp when asked for. */
template <typename T, int E>
__device__ __forceinline__ void write_merged_row(const DecodeArgs &a, int b, int h, int t,
                                                 int q_start, int lane, const float (&acc)[E],
                                                 float sum, float mx)
{
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    uint16_t *orow = a.out + b * a.o_sb + h * a.o_sh + (int64_t)(q_start + t) * a.o_st + lane * E;
    if constexpr (E == 4) {
        uint2 pk;
        pk.x = Pack2<T>::pack(acc[0] * inv, acc[1] * inv);
        pk.y = Pack2<T>::pack(acc[2] * inv, acc[3] * inv);
        *reinterpret_cast<uint2 *>(orow) = pk;
    } else {
        *reinterpret_cast<uint32_t *>(orow) = Pack2<T>::pack(acc[0] * inv, acc[1] * inv);
    }
    if (a.lse != nullptr && lane == 0)
        a.lse[b * a.lse_sb + h * a.lse_sh + q_start + t] = sum > 0.f ? mx + logf(sum) : -INFINITY;
}

/* Merges the nsplit partial results of one row (b, h, t) and writes the output row: one
 * warp, lanes holding the splits' log-sum-exps (split s in lane s % 32) and each lane
 * D/32 output elements. Every split of the grid wrote its partial row (an empty split:
 * zeros and -inf), so all loads are unconditional and issued 32 splits at a time, before
 * the weights are known: a merge of up to 32 splits costs one round trip to L2. Loads go
 * to L2 (.cg): the partials were written by other blocks (of this grid or the one before). */
template <typename T, int D>
__device__ __forceinline__ void merge_row(const DecodeArgs &a, int b, int h, int t, int q_start,
                                          int lane, bool write = true)
{
    constexpr int E = D / 32;
    typedef typename std::conditional<E == 4, float4, float2>::type Vec;
    constexpr int BATCH = 32;
    const int64_t row_id = ((int64_t)b * a.heads_q + h) * a.max_q + t;
    const float *pl = a.part_lse + row_id * a.nsplit;
    const float *po = a.part_o + row_id * a.nsplit * D + lane * E;
    const float l0 = lane < a.nsplit ? __ldcg(pl + lane) : -INFINITY;
    const float l1 = lane + 32 < a.nsplit ? __ldcg(pl + lane + 32) : -INFINITY;
    Vec x[BATCH];
#pragma unroll
    for (int j = 0; j < BATCH; ++j)
        if (j < a.nsplit) x[j] = __ldcg(reinterpret_cast<const Vec *>(po + (int64_t)j * D));

    float mx, w0, w1, sum;
    split_weights(l0, l1, mx, w0, w1, sum);

    float acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
    for (int s0 = 0; s0 < a.nsplit; s0 += BATCH) {
        if (s0 > 0) { /* splits 32.. (at most 64 in all) */
#pragma unroll
            for (int j = 0; j < BATCH; ++j)
                if (s0 + j < a.nsplit)
                    x[j] = __ldcg(reinterpret_cast<const Vec *>(po + (int64_t)(s0 + j) * D));
        }
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            if (s0 + j < a.nsplit) { /* uniform over the warp */
                const float w = __shfl_sync(0xffffffffu, s0 == 0 ? w0 : w1, j);
                if constexpr (E == 4) {
                    acc[0] += w * x[j].x; acc[1] += w * x[j].y;
                    acc[2] += w * x[j].z; acc[3] += w * x[j].w;
                } else {
                    acc[0] += w * x[j].x; acc[1] += w * x[j].y;
                }
            }
        }
    }
    if (write) write_merged_row<T, E>(a, b, h, t, q_start, lane, acc, sum, mx);
}

/* Called by every thread of a block after it wrote its split's partial rows: the block that
 * brings its row group's counter to nsplit merges the group's rows. Each writer's fence
 * (release, device scope) orders its partial results before the block's arrival; the
 * merging block's fence (acquire) orders its reads after it. s_last: one shared int. */
template <typename T, int D>
__device__ __forceinline__ void merge_if_last(const DecodeArgs &a, int rows, int rc, int hk, int b,
                                              int q_len, int q_start, int *s_last)
{
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
    __syncthreads();
    int *counter = &g_arrivals[a.ctr_base + blockIdx.z * gridDim.y + blockIdx.y];
    if (tid == 0) *s_last = atomicAdd(counter, 1) == a.nsplit - 1;
    __syncthreads();
    if (!*s_last) return;
    asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
    for (int lr = warp; lr < rows; lr += blockDim.x / 32) {
        const int rr = rc * ROWS_PER_BLOCK + lr;
        const int gi = rr / a.max_q, t = rr % a.max_q;
        if (t < q_len) merge_row<T, D>(a, b, hk * a.group + gi, t, q_start, lane);
    }
    /* every block of the group has arrived: reset for the next launch or graph replay */
    if (tid == 0) *counter = 0;
}

/* First counter of a launch's slice: consecutive launches take consecutive slices. */
int take_counters(int groups)
{
    static unsigned int cursor = 0;
    unsigned int base = __atomic_fetch_add(&cursor, (unsigned int)groups, __ATOMIC_RELAXED);
    base %= (unsigned int)TM_POOL;
    if (base + (unsigned int)groups > (unsigned int)TM_POOL) base = 0;
    return (int)base;
}

/* The mask of a decode chunk: new token r (at position pos[r]) sees the keys up to itself
 * and before the split's end kend, each with its segment's bias (kb: this tile's per-key
 * biases, base 2, staged in shared memory). */
struct DecodeMask {
    const int (&pos)[2];
    int tile_first, kend;
    const float *kb;
    bool has_bias;
    float scale_log2;
    __device__ __forceinline__ float operator()(int r, int col, float s) const
    {
        const int key = tile_first + col;
        const float bias = has_bias ? kb[col] : 0.f;
        return key <= pos[r] && key < kend ? s * scale_log2 + bias : -INFINITY;
    }
};

/* Writes row r of the warp (kg == 0): the final output and lse when there is one split, else
 * this split's normalised partial output and its log-sum-exp for the merge. */
template <typename T, int D>
__device__ __forceinline__ void write_row(const DecodeArgs &a, int r, int h, int t, int b,
                                          int q_start, int split, int c4, const float (&m)[2],
                                          const float (&l)[2], const float (&o)[D / 8][4])
{
    float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    float lse_v = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    if (a.nsplit == 1) {
        uint16_t *orow = a.out + b * a.o_sb + h * a.o_sh + (int64_t)(q_start + t) * a.o_st;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<uint32_t *>(orow + n * 8 + 2 * c4) =
                Pack2<T>::pack(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (a.lse != nullptr && c4 == 0)
            a.lse[b * a.lse_sb + h * a.lse_sh + q_start + t] = lse_v;
    } else {
        int64_t row_id = ((int64_t)b * a.heads_q + h) * a.max_q + t;
        float *po = a.part_o + (row_id * a.nsplit + split) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<float2 *>(po + n * 8 + 2 * c4) =
                make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (c4 == 0) a.part_lse[row_id * a.nsplit + split] = lse_v;
    }
}

/* ------------------------------------------------- row setup of both decode kernels */

/* How a block's 4 warps share row chunk rc: its rows (up to ROWS_PER_BLOCK), dealt to
 * rg_count row groups of 16; the kg_count warps of a row group split each key tile. This
 * warp takes row group rg and key group kg. */
__device__ __forceinline__ void warp_groups(const DecodeArgs &a, int rc, int warp, int &rows,
                                            int &rg_count, int &kg_count, int &rg, int &kg)
{
    const int rows_total = a.group * a.max_q;
    rows = min(ROWS_PER_BLOCK, rows_total - rc * ROWS_PER_BLOCK);
    rg_count = rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
    kg_count = 4 / rg_count;
    rg = warp % rg_count;
    kg = warp / rg_count;
}

/* Copies a table's segment ends and biases to shared memory and points the view there (the
 * kinds are never read: decode queries are all global). Called by all THREADS_ threads; the
 * caller's next block barrier makes the copy visible. */
template <int THREADS_>
__device__ __forceinline__ void stage_ends_biases(SegView &view, int32_t *s_end, float *s_sbias,
                                                  int tid)
{
    for (int s = tid; s < view.n; s += THREADS_) {
        s_end[s] = view.end[s];
        s_sbias[s] = view.bias[s];
    }
    view.end = s_end;
    view.bias = s_sbias;
}

/* The two rows of a thread whose first row is row `lr0` (and lr0 + step: 8 in the usual
 * fragment layout, 1 in the narrow one) of row chunk rc of KV head hk: its query head,
 * new-token index and position, and whether it exists (rows run over the group's query
 * heads, max_q new tokens each). */
__device__ __forceinline__ void thread_rows(const DecodeArgs &a, int hk, int rc, int lr0, int rows,
                                            int q_len, int kv_len, int (&hrow)[2], int (&trow)[2],
                                            int (&pos)[2], bool (&valid)[2], int step = 8)
{
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int lr = lr0 + r * step;
        int rr = rc * ROWS_PER_BLOCK + lr;
        int gi = rr / a.max_q, t = rr % a.max_q;
        valid[r] = lr < rows && t < q_len;
        hrow[r] = hk * a.group + gi;
        trow[r] = t;
        pos[r] = kv_len - q_len + t;
    }
}

/* The A fragments of Q for the thread's two rows (mma.sync m16n8k16 layout), straight from
 * global memory; rows that do not exist read as zeros. */
template <int D>
__device__ __forceinline__ void q_fragments_global(const DecodeArgs &a, int b, int q_start,
                                                   const int (&hrow)[2], const int (&trow)[2],
                                                   const bool (&valid)[2], int c4,
                                                   uint32_t (&qf)[D / 16][4])
{
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const uint16_t *qrow =
            a.q + b * a.q_sb + hrow[r] * a.q_sh + (int64_t)(q_start + trow[r]) * a.q_st;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t lo = 0, hi = 0;
            if (valid[r]) {
                lo = *reinterpret_cast<const uint32_t *>(qrow + kk * 16 + 2 * c4);
                hi = *reinterpret_cast<const uint32_t *>(qrow + kk * 16 + 8 + 2 * c4);
            }
            qf[kk][r] = lo;
            qf[kk][2 + r] = hi;
        }
    }
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS, 2) decode_kernel(const DecodeArgs a)
{
    extern __shared__ __align__(128) uint8_t smem[];
    /* Launched as a programmatic dependent: scheduled while the previous kernel of the
     * stream drains, it waits here until that kernel's writes are visible. Then it lets its
     * own dependent (the merge kernel, or the next call) get scheduled. */
    grid_dependency_wait();
    grid_dependents_launch();
    const int split = blockIdx.x;
    const int hk = blockIdx.y / a.row_chunks, rc = blockIdx.y % a.row_chunks;
    const int b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;

    const int q_len = a.q_len[b], kv_len = a.kv_len[b];
    const int q_start = a.q_start[b], k_start = a.k_start[b];
    int rows, rg_count, kg_count, rg, kg;
    warp_groups(a, rc, warp, rows, rg_count, kg_count, rg, kg);

    const int chunk = (((kv_len + a.nsplit - 1) / a.nsplit) + BN - 1) / BN * BN;
    const int kbeg = split * chunk;
    const int kend = min(kbeg + chunk, kv_len);

    /* this thread's two rows */
    int hrow[2], trow[2], pos[2];
    bool valid[2];
    thread_rows(a, hk, rc, rg * 16 + g, rows, q_len, kv_len, hrow, trow, pos, valid);

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

    uint8_t *s_pipe = smem;
    int32_t *s_end = reinterpret_cast<int32_t *>(smem + (smem_bytes<D>() - SEG_CAP * 8));
    float *s_sbias = reinterpret_cast<float *>(s_end + SEG_CAP);

    if (kbeg < kend) {
        /* Q fragments straight from global memory (rows padded with zeros) */
        uint32_t qf[D / 16][4];
        q_fragments_global<D>(a, b, q_start, hrow, trow, valid, c4, qf);

        /* per-key biases: segment table staged in shared memory when small */
        SegView view = make_view(a.seg_ptr, a.seg_end, a.seg_kind, a.seg_bias, b);
        const bool has_bias = view.bias != nullptr && view.n > 0;
        if (has_bias && view.n <= SEG_CAP) stage_ends_biases<THREADS>(view, s_end, s_sbias, tid);
        /* the kinds are never read here: decode queries are all global */

        const uint16_t *kbase = a.k + b * a.k_sb + hk * a.k_sh + (int64_t)(k_start + kbeg) * a.k_st;
        const uint16_t *vbase = a.v + b * a.v_sb + hk * a.v_sh + (int64_t)(k_start + kbeg) * a.v_st;
        const int nkeys = kend - kbeg;
        const int ntiles = (nkeys + BN - 1) / BN;
        const uint32_t spipe = smem_addr(s_pipe);
        constexpr int STAGE = 2 * BN * D * 2 + BN * 4;

        __syncthreads(); /* staged table visible */
        auto issue = [&](int t) {
            int st = t % NSTAGE;
            uint32_t sk = spipe + st * STAGE, sv = sk + BN * D * 2;
            load_tile<BN, D, THREADS>(sk, kbase + (int64_t)t * BN * a.k_st, a.k_st,
                                      nkeys - t * BN, tid);
            load_tile<BN, D, THREADS>(sv, vbase + (int64_t)t * BN * a.v_st, a.v_st,
                                      nkeys - t * BN, tid);
            if (has_bias && tid < BN) {
                int key = kbeg + t * BN + tid;
                float bias = key < kend ? view.bias_of(view.seg(key)) * kLog2e : 0.f;
                reinterpret_cast<float *>(s_pipe + st * STAGE + 2 * BN * D * 2)[tid] = bias;
            }
        };
#pragma unroll
        for (int t = 0; t < NSTAGE - 1; ++t) {
            if (t < ntiles) issue(t);
            cp_async_commit();
        }

        for (int t = 0; t < ntiles; ++t) {
            cp_async_wait<NSTAGE - 2>();
            __syncthreads();
            if (t + NSTAGE - 1 < ntiles) issue(t + NSTAGE - 1);
            cp_async_commit();

            const int st = t % NSTAGE;
            const uint32_t sk = spipe + st * STAGE, sv = sk + BN * D * 2;
            const float *kb = reinterpret_cast<const float *>(s_pipe + st * STAGE + 2 * BN * D * 2);
            const DecodeMask mask{pos, kbeg + t * BN, kend, kb, has_bias, a.scale_log2};
            for (int cchunk = kg; cchunk < BN / 16; cchunk += kg_count)
                attend_chunk<T, D, CpAsyncTile<D>, 4>(sk, sv, cchunk, mask, qf, m, l, o);
        }
        cp_async_wait<0>();
    }
    __syncthreads(); /* the pipeline buffers become the merge area */

    /* merge the warps that share rows (same rg, different key shares) */
    merge_warps<D>(reinterpret_cast<float *>(smem), warp, lane, kg, kg_count, rg_count, m, l, o);

    /* write: the final result (one split) or this split's partial result */
#pragma unroll
    for (int r = 0; r < 2; ++r)
        if (valid[r] && kg == 0)
            write_row<T, D>(a, r, hrow[r], trow[r], b, q_start, split, c4, m, l, o);
}

/* Merges the splits of one row: one warp (merge_row). The row's lengths and all its partial
 * results are loaded at once, so the merge costs one round trip to L2 after the split
 * kernel's writes become visible. (Loading the partials only once the row was known to
 * exist, and each split's only once its weight was, made three trips in a row: on an H100,
 * 24 q / 8 kv heads, d = 128, one new token, three rounds in alternating processes against
 * that build, 1 x 2k took 6.85-6.95 us against 7.40-7.50, 1 x 8k 10.8-11.0 against
 * 11.3-11.6, 1 x 32k 50.2-50.4 against 51.0-51.6; SDPA 7.3-7.4, 11.7-12.0, 51.5-52.3.)
 * A row past its sequence's new tokens reads partials no split wrote, inside the
 * workspace, and writes nothing. */
template <typename T, int D>
__global__ void __launch_bounds__(32) combine_kernel(const DecodeArgs a)
{
    /* launched as a programmatic dependent of decode_kernel: wait for its results */
    grid_dependency_wait();
    grid_dependents_launch();
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int q_len = a.q_len[b], q_start = a.q_start[b];
    merge_row<T, D>(a, b, h, t, q_start, threadIdx.x, t < q_len);
}

int sm_count()
{
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
        cudaGetLastError();
        return 132;
    }
    return n;
}

int row_chunks(const sf_attn_params *p, int max_q)
{
    int rows = (p->heads_q / p->heads_kv) * max_q;
    return (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
}

/*
 * Launch policy of decode_kernel, and which kernel runs when the row groups alone fill the
 * chip. Chosen from one H100 run that timed four policies against SDPA (24 q / 8 kv heads,
 * d = 128, bf16, one new token, CUDA-graph replay medians, us):
 *
 *     blocks/SM, tiles/split, merge    1 x 256  1 x 2k  1 x 8k  1 x 32k  32 x 2k
 *     2 (up), >= 4, combine kernel         6.4     8.6    13.7     53.5     93.0
 *     1 (down), >= 2, combine kernel       6.7     8.5    12.8     50.9     92.6
 *     2 (up), >= 4, merged in kernel       6.1     9.2    12.9     54.6     92.2
 *     1 (down), >= 2, merged in kernel     7.5     8.5    12.5     51.2     92.7
 *     SDPA (same runs)                 6.2-6.3 7.7-7.9 12.0-12.2 51.5-51.8 91.4-92.0
 *
 * One block per multiprocessor streams long caches best (the second block only adds
 * merge work: 32k reads at 2.64 TB/s against 2.51), and a split shorter than 4 tiles
 * costs more in merging than its parallelism brings (256 keys: one split, 6.4 us, against
 * two, 6.7 / 7.5 us). The in-kernel merge showed no consistent gain (and a loss at 2k and
 * 256 with splits), so a second kernel merges. Run-to-run spread is about 0.3 us.
 *
 * Then, with the split kernel itself a programmatic dependent launch (scheduled while the
 * kernel before it drains), pipeline stages x fewest tiles per split (builds with
 * -DSEGFLEX_DECODE_STAGES / -DSEGFLEX_DECODE_MIN_TILES), and the splits of a row group run
 * as one thread-block cluster merging through distributed shared memory instead of the
 * combine kernel (at most 8 or 16 blocks per cluster, fewest tiles per split):
 *
 *     stages, tiles, merge              1 x 256  1 x 2k  1 x 8k  1 x 32k  32 x 2k
 *     3, >= 4, combine kernel               5.8     8.2    11.9     50.5     92.9
 *     6, >= 4, combine kernel               5.8     8.0    11.9     51.5     93.4
 *     6, >= 2, combine kernel               6.7     7.9    11.7     51.2     92.8
 *     4, >= 2, combine kernel               6.7     7.9    12.0     51.3     93.3
 *     3, >= 2, cluster <= 8                 6.8     8.5    16.5     52.5     92.3
 *     3, >= 1, cluster <= 16                7.8     9.3    18.0     61.1     92.4
 *     SDPA (same runs)                  6.3-6.4 7.6-8.0 12.0-12.4 51.4-51.9 91.4-92.1
 *
 * The programmatic launch took 0.5-1 us off every batch-1 size. Clusters lost everywhere:
 * a cluster launch and its two barriers cost more than the combine kernel, which the
 * programmatic launch already overlaps, and eight blocks per row group stream a long cache
 * slower than sixteen. Pipeline depth changes nothing beyond the spread; two tiles per split
 * give back the 256-key case (two splits and a merge instead of one split).
 *
 * Hence the default: three stages; a cache of at most 4 tiles is one split (no merge), a
 * longer one has splits of at least 2 tiles (-DSEGFLEX_DECODE_WHOLE_TILES, _MIN_TILES). At
 * batch 1 this changes only caches of 5 to 63 tiles (2k: 16 splits of 2 tiles instead of 8
 * of 4). Two runs each, on one machine, against the build with at least 4 tiles per split:
 *
 *     build                             1 x 256  1 x 2k  1 x 8k  1 x 32k  32 x 2k
 *     whole <= 4 tiles, else >= 2       6.0 5.7 7.9 7.8 12.0 12.1 50.7 51.0 93.5 94.3
 *     >= 4 tiles                        5.9 6.0 8.4 8.5 11.9 12.2 50.7 50.8 93.4 93.6
 *     SDPA (same runs)                  6.3-6.6 7.9-8.0 12.1-12.5 51.7-51.9 91.8-92.9
 */
struct Policy {
    int per_sm;     /* blocks per multiprocessor the splits aim at */
    int round_up;   /* 1: at least per_sm blocks per SM; 0: at most per_sm blocks per SM */
    int min_tiles;  /* fewest 64-key tiles per split (applied through the workspace size) */
    int whole_tiles; /* caches of at most this many tiles are not split */
    int wide_tma;   /* row groups >= SMs: 1 = decode_tma_kernel, 0 = decode_kernel */
};
constexpr Policy kPolicy = {1, 0, SEGFLEX_DECODE_MIN_TILES, SEGFLEX_DECODE_WHOLE_TILES, 1};

const Policy &policy() { return kPolicy; }

/* Row groups of a launch: the blocks one split of the keys needs. */
int64_t row_groups(int batch, const sf_attn_params *p, int max_q)
{
    return (int64_t)batch * p->heads_kv * row_chunks(p, max_q);
}

/* Splits of decode_kernel: the policy's blocks per multiprocessor and, when the longest
 * cache is known (max_kv_len > 0, workspace sizing), one split for a cache of at most
 * whole_tiles tiles, else at least min_tiles tiles per split: below that the merge and the
 * per-block start-up cost more than the parallelism brings. The launch passes 0 and is held
 * to the workspace size, which carries that cap. */
int old_splits(int batch, const sf_attn_params *p, int max_q, int max_kv_len)
{
    const Policy &pol = policy();
    const int64_t groups = row_groups(batch, p, max_q);
    const int64_t target = (int64_t)pol.per_sm * sm_count();
    int64_t s = (target + (pol.round_up ? groups - 1 : 0)) / groups;
    if (s > MAX_SPLITS) s = MAX_SPLITS;
    if (max_kv_len > 0) {
        const int64_t span = (int64_t)pol.min_tiles * BN;
        const int64_t useful = max_kv_len <= (int64_t)pol.whole_tiles * BN
                                   ? 1
                                   : ((int64_t)max_kv_len + span - 1) / span;
        if (s > useful) s = useful;
    }
    return s < 1 ? 1 : (int)s;
}

size_t bytes_per_split(int batch, int max_q, const sf_attn_params *p)
{
    return (size_t)batch * p->heads_q * max_q * (p->head_dim + 1) * sizeof(float);
}

template <typename T, int D>
sf_status launch(DecodeArgs a, int heads_kv, int batch, cudaStream_t stream)
{
    constexpr int bytes = smem_bytes<D>();
    static unsigned long long configured = 0;
    if (!configure_once((const void *)decode_kernel<T, D>, bytes, &configured)) return SF_ERR_CUDA;
    /* Both kernels are programmatic dependents: the split kernel is scheduled while the
     * previous kernel of the stream drains, the merge kernel while the split kernel runs. */
    const dim3 grid(a.nsplit, heads_kv * a.row_chunks, batch);
    const sf_status st = launch_dependent(decode_kernel<T, D>, grid, dim3(THREADS), bytes, stream, a);
    if (st != SF_OK || a.nsplit == 1) return st;
    return launch_dependent(combine_kernel<T, D>, dim3(a.max_q, a.heads_q, batch), dim3(32), 0,
                            stream, a);
}

} // namespace
} // namespace sfcuda

#include "decode_tma.cuh"

namespace sfcuda {
namespace {

/*
 * Which implementation runs. SEGFLEX_DECODE_IMPL (read once per process, so that the
 * workspace size and the launch always agree): =old selects decode_kernel everywhere; =new
 * selects decode_tma_kernel strictly (a cache it cannot take is an argument error, never a
 * silent fallback); unset (the default) picks per call from the shape, on sm_90 and later
 * (older devices: the old kernel).
 *
 * The default's rule, from one H100 run (24 q / 8 kv heads, d = 128, bf16, one new token,
 * CUDA-graph replay medians, us; new = decode_tma_kernel, old = decode_kernel):
 *
 *     batch x cache   1 x 256   1 x 2k   1 x 8k   1 x 32k   32 x 2k
 *     new                 7.5      9.5     15.5      54.5      92.7
 *     old                 6.2      8.5     13.8      53.6      97.3
 *     SDPA                6.3      7.8     12.3      51.3      91.6
 *
 * At batch 1 the 8 row groups need ~33 splits to fill the chip, and the old kernel (a few
 * tiles per split, merged by a second kernel) is ahead at every cache length. At batch 32
 * the 256 row groups fill the chip unsplit: the TMA kernel streams each group in one block
 * (one wave, no merge) while the old kernel, aiming at two blocks per multiprocessor, takes
 * two splits, two waves and a combine kernel. So: the TMA kernel when the row groups alone
 * reach one per multiprocessor (the policy's wide_tma may override), the old kernel below,
 * and the old kernel too for caches a tensor map cannot describe.
 */
enum { IMPL_OLD = 0, IMPL_AUTO = 1, IMPL_TMA_STRICT = 2 };
int decode_impl()
{
    static const int impl = [] {
        const char *e = getenv("SEGFLEX_DECODE_IMPL");
        if (e != nullptr && strcmp(e, "old") == 0) return (int)IMPL_OLD;
        if (e != nullptr && strcmp(e, "new") == 0) return (int)IMPL_TMA_STRICT;
        return device_has_tma() ? (int)IMPL_AUTO : (int)IMPL_OLD;
    }();
    return impl;
}

/* Whether a call of this shape goes to decode_tma_kernel: depends only on the batch, the
 * heads, the new tokens and the chip, so the workspace query and the launch agree. */
bool use_tma(int batch, const sf_attn_params *p, int max_q)
{
    const int impl = decode_impl();
    if (impl != IMPL_AUTO) return impl == IMPL_TMA_STRICT;
    return policy().wide_tma && row_groups(batch, p, max_q) >= sm_count();
}

} // namespace
} // namespace sfcuda

using namespace sfcuda;

extern "C" size_t sf_cuda_workspace_bytes(int32_t batch, int32_t max_q_len, int32_t max_kv_len,
                                          const sf_attn_params *params)
{
    if (params == nullptr || batch <= 0 || max_q_len <= 0 || params->heads_kv <= 0 ||
        params->heads_q <= 0 || params->heads_q % params->heads_kv != 0)
        return 0;
    const int s = use_tma(batch, params, max_q_len)
                      ? tma_splits(batch, params, max_q_len, max_kv_len)
                      : old_splits(batch, params, max_q_len, max_kv_len);
    return s <= 1 ? 0 : (size_t)s * bytes_per_split(batch, max_q_len, params);
}

extern "C" sf_status sf_cuda_decode(const sf_layouts *layouts, const sf_seqs *seqs,
                                    const sf_attn_params *params, sf_tensor q, sf_tensor k,
                                    sf_tensor v, sf_tensor out, float *lse, int64_t lse_stride_b,
                                    int64_t lse_stride_h, void *workspace, size_t workspace_bytes,
                                    void *stream)
{
    bool nothing;
    const sf_status checked = check_call(layouts, seqs, params, q, k, v, out, &nothing);
    if (checked != SF_OK) return checked;
    if (seqs->max_q_len > 8) return SF_ERR_ARGUMENT;
    if (nothing) return SF_OK;
    if ((q.stride_t % 2) != 0) return SF_ERR_ARGUMENT;

    DecodeArgs a;
    pack_args(a, layouts, seqs, params, q, k, v, out, lse, lse_stride_b, lse_stride_h);
    a.heads_q = params->heads_q;
    a.max_q = seqs->max_q_len;
    a.row_chunks = row_chunks(params, seqs->max_q_len);

    a.part_o = (float *)workspace;
    a.ctr_base = 0;
    if ((int64_t)a.row_chunks * params->heads_kv > 65535) return SF_ERR_ARGUMENT;
    const size_t per = bytes_per_split(seqs->batch, seqs->max_q_len, params);
    const size_t fit =
        workspace == nullptr || ((uintptr_t)workspace % 16) != 0 ? 0 : workspace_bytes / per;
    /* As many splits as wanted and as the workspace holds (one needs none); the partial
     * log-sum-exps follow the partial outputs. */
    auto set_splits = [&](int s) {
        if ((size_t)s > fit) s = (int)fit;
        if (s < 2) s = 1;
        a.nsplit = s;
        a.part_lse = a.part_o + (size_t)s * seqs->batch * params->heads_q * seqs->max_q_len *
                                    params->head_dim;
    };

    cudaStream_t st = (cudaStream_t)stream;
    const bool bf = params->dtype == SF_BFLOAT16;
    if (use_tma(seqs->batch, params, seqs->max_q_len)) {
        set_splits(tma_splits(seqs->batch, params, seqs->max_q_len, 0));
        sf_status r;
        if (params->head_dim == 64)
            r = bf ? launch_tma<__nv_bfloat16, 64>(a, params->heads_kv, seqs->batch, st)
                   : launch_tma<__half, 64>(a, params->heads_kv, seqs->batch, st);
        else
            r = bf ? launch_tma<__nv_bfloat16, 128>(a, params->heads_kv, seqs->batch, st)
                   : launch_tma<__half, 128>(a, params->heads_kv, seqs->batch, st);
        if (r != SF_ERR_ARGUMENT || decode_impl() == IMPL_TMA_STRICT) return r;
        /* K or V has no tensor-map description (odd strides): the old kernel serves it */
    }
    set_splits(old_splits(seqs->batch, params, seqs->max_q_len, 0));
    if (params->head_dim == 64)
        return bf ? launch<__nv_bfloat16, 64>(a, params->heads_kv, seqs->batch, st)
                  : launch<__half, 64>(a, params->heads_kv, seqs->batch, st);
    return bf ? launch<__nv_bfloat16, 128>(a, params->heads_kv, seqs->batch, st)
              : launch<__half, 128>(a, params->heads_kv, seqs->batch, st);
}

/*
 * plan.cuh - the tile plan of the prefill kernels: which key tiles a block of query rows
 * has to visit, and which of them need the mask.
 *
 * Before touching K/V, a block classifies every key tile at or before its last query
 * against its rows straight from the segment table (classify_rect): empty tiles never
 * enter the plan (never loaded), full tiles run without mask arithmetic, partial tiles
 * evaluate the mask and the bias per key. The three prefill kernels (prefill.cu,
 * prefill_sm90.cu, prefill_small.cu) plan the same way and differ only in tile sizes and
 * thread counts, so the planning code lives here once.
 */
#ifndef SEGFLEX_CUDA_PLAN_CUH
#define SEGFLEX_CUDA_PLAN_CUH

#include "common.cuh"

namespace sfcuda {

/* The query rows of a prefill block: blockIdx.x is the query head, blockIdx.z the sequence,
 * blockIdx.y the tile of BM rows counted from the end (the rows with the most keys start
 * first, so the longest blocks are not left for a last wave). */
struct BlockRows {
    int h, b, hk;
    int q_len, kv_len, q_start, k_start;
    int i0;     /* the tile's first row */
    int p0, p1; /* positions of its first and last rows within q_len */
    int jlast;  /* the diagonal key tile of BN keys: never empty (query p1 sees key p1) */
};

/* The fields of r that follow from its head, sequence, first row and lengths. */
template <int BM, int BN> __device__ __forceinline__ void finish_rows(const AttnArgs &a, BlockRows &r)
{
    r.hk = r.h / a.group;
    const int off = r.kv_len - r.q_len; /* position of query row 0 */
    r.p0 = off + r.i0;
    r.p1 = off + min(r.i0 + BM, r.q_len) - 1;
    r.jlast = r.p1 / BN;
}

/* Fills r for query head h, sequence b and the tile of BM rows that is `from_end` tiles
 * before the last of `tiles`; false when the tile lies past the sequence's q_len (nothing to
 * do). The four lengths and starts are loaded together, before anything depends on them.
 * With JOIN_LOADS the exit also waits for them all and for `pending` (any other value the
 * caller loaded with them): see below. */
template <int BM, int BN, bool JOIN_LOADS = false>
__device__ __forceinline__ bool rows_at(const AttnArgs &a, int h, int b, int from_end, int tiles,
                                        BlockRows &r, int pending = 0)
{
    r.h = h;
    r.b = b;
    r.q_len = load_now(a.q_len + r.b);
    r.kv_len = load_now(a.kv_len + r.b);
    r.q_start = load_now(a.q_start + r.b);
    r.k_start = load_now(a.k_start + r.b);
    r.i0 = (tiles - 1 - from_end) * BM;
    /* The exit test is i0 >= q_len. The other values are never negative and change nothing,
     * but folded into one sign test they make the exit wait for every load above, so the
     * assembler cannot sink the loads the exit does not need into a second trip to memory:
     * that matters where the block's prologue is its critical path (the grid kernels); the
     * persistent kernel's producer keeps the plain test. */
    const bool past = JOIN_LOADS
                          ? ((r.q_len - 1 - r.i0) | r.kv_len | r.q_start | r.k_start | pending) < 0
                          : r.i0 >= r.q_len;
    if (past) return false;
    finish_rows<BM, BN>(a, r);
    return true;
}

/* The rows of this block of a one-block-per-tile grid (x: head, y: tile from the end, z:
 * sequence), and where its sequence's segments lie (seg), loaded in the same trip. */
template <int BM, int BN>
__device__ __forceinline__ bool block_rows(const AttnArgs &a, BlockRows &r, SegRange &seg)
{
    seg = load_seg_range(a.seg_ptr, blockIdx.z);
    return rows_at<BM, BN, true>(a, blockIdx.x, blockIdx.z, blockIdx.y, gridDim.y, r,
                                 seg.s0 | seg.s1);
}

/* A plan entry is a key tile index, with this bit set when the tile needs no mask. */
constexpr uint32_t FULL_BIT = 0x80000000u;

/* The plan entry of a non-empty tile j of class cls (SF_BLOCK_FULL or SF_BLOCK_PARTIAL). */
__device__ __forceinline__ uint32_t plan_entry(int j, int cls)
{
    return (uint32_t)j | (cls == SF_BLOCK_FULL ? FULL_BIT : 0u);
}

/* Barrier over the THREADS threads that plan: the whole block (BAR = 0), or, for a
 * warp-specialised block where one warpgroup plans alone, named barrier BAR. */
template <int THREADS, int BAR> __device__ __forceinline__ void plan_sync()
{
    if (BAR == 0) __syncthreads();
    else asm volatile("bar.sync %0, %1;\n" ::"n"(BAR), "n"(THREADS) : "memory");
}

/* Appends the entries of the threads that keep one to s_plan after its first nplan, in
 * thread order, and returns the new count (the same in every thread). Called by all THREADS
 * threads that plan; each warp's keepers are compacted with a ballot, the warps' counts
 * meet in s_count (THREADS / 32 ints of shared memory). */
template <int THREADS, int BAR>
__device__ __forceinline__ int append_kept(bool keep, uint32_t entry, int nplan, uint32_t *s_plan,
                                           int32_t *s_count, int tid)
{
    const int warp = tid >> 5, lane = tid & 31;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) s_count[warp] = __popc(ballot);
    plan_sync<THREADS, BAR>();
    int before = nplan, total = nplan;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) {
        if (w < warp) before += s_count[w];
        total += s_count[w];
    }
    if (keep) s_plan[before + __popc(ballot & ((1u << lane) - 1u))] = entry;
    plan_sync<THREADS, BAR>(); /* s_count is rewritten by the next batch of candidates */
    return total;
}

/*
 * One planning round, called by all THREADS threads that plan (it holds their barriers):
 * classifies key tiles jbase .. jbase+ncand-1 of BN keys against query positions [p0, p1]
 * of a sequence with kv_len keys, and writes the non-empty ones, in ascending order, to
 * s_plan (FULL_BIT on the tiles that need no mask). Returns their count, the same in every
 * thread. A full tile becomes partial when a bias applies (the mask-free path adds none)
 * or when it runs past kv_len (the mask-free path would see the zero rows).
 * Thread t takes candidates t, t + THREADS, ...
 */
template <int BN, int THREADS, int BAR = 0>
__device__ __forceinline__ int plan_round(const SegView &view, int p0, int p1, int kv_len,
                                          int jbase, int ncand, uint32_t *s_plan,
                                          int32_t *s_count, int tid)
{
    int nplan = 0;
    for (int c0 = 0; c0 < ncand; c0 += THREADS) {
        const int j = jbase + c0 + tid;
        int cls = SF_BLOCK_EMPTY;
        if (c0 + tid < ncand) {
            bool nb;
            const int k0 = j * BN, k1 = min(k0 + BN - 1, kv_len - 1);
            cls = classify_rect(view, p0, p1, k0, k1, &nb);
            if (cls == SF_BLOCK_FULL && (nb || k0 + BN > kv_len)) cls = SF_BLOCK_PARTIAL;
        }
        nplan = append_kept<THREADS, BAR>(cls != SF_BLOCK_EMPTY, plan_entry(j, cls), nplan, s_plan,
                                          s_count, tid);
    }
    return nplan;
}

/* One entry of a segment table, loaded into registers ahead of its copy to shared memory. */
struct TableEntry {
    int32_t end;
    uint8_t kind;
    float bias;
};

/* Loads entry `tid` of a table of at most cap segments (the first that stage_table copies):
 * issued before a block's bulk loads, the table no longer queues behind them. */
__device__ __forceinline__ TableEntry prefetch_table(const SegView &view, int cap, int tid)
{
    TableEntry e{0, 0, 0.f};
    if (view.n <= cap && tid < view.n) {
        e.end = view.end[tid];
        e.kind = view.kind[tid];
        e.bias = view.bias ? view.bias[tid] : 0.f;
    }
    return e;
}

/* Copies entries from, from + THREADS, ... of a table into shared memory. */
template <int THREADS>
__device__ __forceinline__ void copy_entries(const SegView &view, int32_t *s_end, uint8_t *s_kind,
                                             float *s_bias, int from)
{
    for (int s = from; s < view.n; s += THREADS) {
        s_end[s] = view.end[s];
        s_kind[s] = view.kind[s];
        s_bias[s] = view.bias ? view.bias[s] : 0.f;
    }
}

/* Points a staged view at its copy in shared memory. */
__device__ __forceinline__ void point_to(SegView &view, int32_t *s_end, uint8_t *s_kind,
                                         float *s_bias)
{
    view.end = s_end;
    view.kind = s_kind;
    view.bias = s_bias;
}

/*
 * Copies a sequence's segment table into shared memory when it has at most cap segments
 * and points the view there (lookups then cost shared loads, not L2 round trips); larger
 * tables stay in global memory. Called by all THREADS threads, with the entry that
 * prefetch_table loaded; the caller's next block barrier makes the copy visible.
 */
template <int THREADS>
__device__ __forceinline__ void stage_table(SegView &view, int cap, int32_t *s_end,
                                            uint8_t *s_kind, float *s_bias, int tid,
                                            const TableEntry &first)
{
    if (view.n > cap) return;
    if (tid < view.n) {
        s_end[tid] = first.end;
        s_kind[tid] = first.kind;
        s_bias[tid] = first.bias;
    }
    copy_entries<THREADS>(view, s_end, s_kind, s_bias, tid + THREADS);
    point_to(view, s_end, s_kind, s_bias);
}

/* The same, loading every entry itself. */
template <int THREADS>
__device__ __forceinline__ void stage_table(SegView &view, int cap, int32_t *s_end,
                                            uint8_t *s_kind, float *s_bias, int tid)
{
    if (view.n > cap) return;
    copy_entries<THREADS>(view, s_end, s_kind, s_bias, tid);
    point_to(view, s_end, s_kind, s_bias);
}

/* The mask facts of one key: its segment, or -1 when the segment is shared (every later
 * query of the sequence sees it), and its bias in base 2. Partial tiles keep these per key
 * in shared memory. */
__device__ __forceinline__ void key_facts(const SegView &view, int key, int32_t *seg, float *bias2)
{
    const int sg = view.seg(key);
    *seg = view.kind_of(sg) == SF_SHARED ? -1 : sg;
    *bias2 = view.bias_of(sg) * kLog2e;
}

} // namespace sfcuda

#endif

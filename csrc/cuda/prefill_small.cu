/*
 * prefill_small.cu - segment-masked attention for problems too small to fill the GPU
 * with prefill.cu's blocks (one short prompt of a few hundred tokens).
 *
 * There the kernel time is the chain of one block: prefill.cu's block holding the last
 * rows (the global tail, which sees every key) runs all of its key tiles one after
 * another in every warp, with one warp per scheduler issuing an instruction every ~6
 * cycles. This kernel cuts that chain four ways, the way the decode kernel does:
 *
 *   - a block takes 16 query rows of one query head of one sequence, and all 4 warps
 *     hold those same rows (Q fragments straight from global memory into registers);
 *   - every 64-key tile is dealt to the warps in 16-key chunks (warp w takes keys
 *     16w..16w+15 of each tile, key_split.cuh's attend_chunk), each warp keeping its own
 *     online-softmax state; after the last tile the four states are merged in shared
 *     memory, each warp merging and writing a quarter of the output columns
 *     (merge_warps_by_columns).
 *
 * The grid has 4x the blocks of prefill.cu, a warp computes a quarter of the keys of its
 * block's tiles, and three blocks share an SM (registers held to 168 per thread), so a
 * scheduler has warps to interleave. The plan is prefill.cu's (plan.cuh), made finer: it
 * classifies each 16-key chunk of a tile, so a chunk no row of the block sees is neither
 * loaded nor computed (the 16 rows of a short segment see one to three of the chunks of
 * their tiles), and a chunk every row sees whole runs without mask arithmetic. Otherwise
 * as prefill.cu: the diagonal tile fetched before planning (its chunks up to the last
 * row), tiles processed from the diagonal down, the per-key facts of partial tiles in
 * shared memory, K and V read in place (any GQA ratio), rows past q_len never read nor
 * written, keys past kv_len never read.
 *
 * With all of a short problem's blocks in one wave, every block's prologue is on the
 * critical path, and the SM's loads queue behind the K/V tiles of its three blocks. So the
 * first loads (lengths, starts, segment range) go out in one trip to memory, and the
 * segment table, which the plan waits for, is loaded before the K/V and Q traffic.
 *
 * K/V tiles arrive through a cp.async pipeline of NSTAGE stages loaded by all 128
 * threads: 2 stages at head dim 128 (64 KB, so three blocks fit in an SM's 228 KB),
 * 3 at head dim 64.
 */
#include "key_split.cuh"
#include "plan.cuh"
#include "prefill.cuh"

namespace sfcuda {
namespace {

constexpr int BM = SMALL_BM;   /* query rows per block: one mma row block */
constexpr int BN = 64;         /* keys per tile: one 16-key chunk per warp */
constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int PLAN_CAP = 256;  /* key tiles classified per planning round */
constexpr int SEG_CAP = 512;   /* segment tables up to this size are staged in shared memory */
constexpr int MIN_BLOCKS = 3;  /* blocks per SM the registers are held to */
static_assert(WARPS * 16 == BN, "each warp takes one 16-key chunk of a tile");

/* Shared memory, in bytes from the (128-aligned) base:
 *   stages [NSTAGE][K tile | V tile] | plan | segment table (end, bias) |
 *   key facts [NSTAGE][seg BN | bias BN] | per-warp counts | segment kinds
 * After the tile loop the stages hold the warps' exchange area for the merge. */
template <int D> struct Layout {
    static constexpr int NSTAGE = D == 64 ? 3 : 2;
    static constexpr int TILE = BN * D * 2;
    static constexpr int STAGE = 2 * TILE;
    static constexpr int OFF_PLAN = NSTAGE * STAGE;
    static constexpr int OFF_END = OFF_PLAN + PLAN_CAP * 4;
    static constexpr int OFF_BIAS = OFF_END + SEG_CAP * 4;
    static constexpr int OFF_FACTS = OFF_BIAS + SEG_CAP * 4;
    static constexpr int OFF_COUNT = OFF_FACTS + NSTAGE * 2 * BN * 4;
    static constexpr int OFF_KIND = OFF_COUNT + WARPS * 4;
    static constexpr int BYTES = OFF_KIND + SEG_CAP;
    static_assert(merge_warps_bytes<D>() <= OFF_PLAN, "the merge area lies in the stages");
    /* with the 1 KB the hardware reserves per block, MIN_BLOCKS blocks fit in 228 KB */
    static_assert(MIN_BLOCKS * (BYTES + 1024) <= 228 * 1024, "shared memory per SM");
};

/* The segment facts of the thread's two rows (g and g + 8 of the block's 16). */
struct RowFacts {
    int pos[2];   /* position in the sequence */
    int seg[2];   /* segment index */
    bool glob[2]; /* the segment is global: sees every earlier key, with the keys' bias */
};

/* A step's plan entry: its key tile, and for each 16-key chunk of the tile (warp w's share)
 * whether any query row of the block sees a key of it (bit SEEN_SHIFT + w) and whether
 * every row sees every key of it with no bias (bit FULL_SHIFT + w: no mask arithmetic).
 * A chunk no row sees is neither loaded nor computed: for the rows of a short segment
 * that is most of their tiles. */
constexpr int SEEN_SHIFT = 24, FULL_SHIFT = 28;
constexpr uint32_t TILE_BITS = (1u << SEEN_SHIFT) - 1u;
static_assert(WARPS == 4 && (TILE_BITS + 1u) * BN >= (1u << 30), "4 chunk bits; keys below 2^30");

/*
 * One planning round of the whole block: plan.cuh's plan_round, classifying each 16-key
 * chunk of the ncand tiles from jbase against query positions [p0, p1] instead of whole
 * tiles. Thread t takes chunk c % 4 of tile jbase + c / 4 (c = c0 + t); the four lanes of a
 * tile combine their bits by shuffles, and the first keeps the tile when a chunk is seen.
 * Returns the number of entries written to s_plan, ascending.
 */
__device__ __forceinline__ int plan_chunks(const SegView &view, int p0, int p1, int kv_len,
                                           int jbase, int ncand, uint32_t *s_plan,
                                           int32_t *s_count, int tid)
{
    const int q = tid & 3;
    int nplan = 0;
    for (int c0 = 0; c0 < 4 * ncand; c0 += THREADS) {
        const int c = c0 + tid, j = jbase + c / 4;
        uint32_t bits = 0;
        if (c < 4 * ncand) {
            bool nb;
            const int k0 = j * BN + q * 16, k1 = min(k0 + 15, kv_len - 1);
            int cls = classify_rect(view, p0, p1, k0, k1, &nb); /* empty past kv_len */
            if (cls == SF_BLOCK_FULL && (nb || k0 + 16 > kv_len)) cls = SF_BLOCK_PARTIAL;
            if (cls != SF_BLOCK_EMPTY) bits |= 1u << (SEEN_SHIFT + q);
            if (cls == SF_BLOCK_FULL) bits |= 1u << (FULL_SHIFT + q);
        }
        bits |= __shfl_xor_sync(0xffffffffu, bits, 1);
        bits |= __shfl_xor_sync(0xffffffffu, bits, 2);
        nplan = append_kept<THREADS, 0>(q == 0 && bits != 0, (uint32_t)j | bits, nplan, s_plan,
                                        s_count, tid);
    }
    return nplan;
}

/* Mask of a full chunk: every pair allowed, no bias (plan_chunks guarantees both). */
struct FullTileMask {
    float scale_log2;
    __device__ __forceinline__ float operator()(int, int, float s) const { return s * scale_log2; }
};

/* Mask of a partial tile, from the row facts and the per-key facts of the tile (segment,
 * -1 for shared keys, and bias in base 2): a key is seen when it does not follow the
 * query and the query is global, or the key is in the query's segment, or it is shared.
 * Only global queries add the keys' bias. */
struct PartialTileMask {
    const int32_t *kseg;
    const float *kbias;
    int key0; /* position of the tile's first key */
    RowFacts rows;
    float scale_log2;
    __device__ __forceinline__ float operator()(int r, int col, float s) const
    {
        const int ks = kseg[col];
        const bool ok =
            key0 + col <= rows.pos[r] && (rows.glob[r] || ks == rows.seg[r] || ks < 0);
        const float bias = rows.glob[r] ? kbias[col] : 0.f;
        return ok ? s * scale_log2 + bias : -INFINITY;
    }
};


template <typename T, int D>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) prefill_small_kernel(const PrefillArgs a)
{
    using L = Layout<D>;
    constexpr int NSTAGE = L::NSTAGE;
    extern __shared__ __align__(128) uint8_t smem[];
    /* The loads that depend on nothing come first, so that their trips to memory overlap:
     * the chain of dependent loads before the first tile is what a short problem waits for. */
    BlockRows br;
    SegRange seg;
    if (!block_rows<BM, BN>(a, br, seg)) return;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;

    const uint32_t spipe = smem_addr(smem);
    uint32_t *s_plan = reinterpret_cast<uint32_t *>(smem + L::OFF_PLAN);
    int32_t *s_end = reinterpret_cast<int32_t *>(smem + L::OFF_END);
    float *s_bias = reinterpret_cast<float *>(smem + L::OFF_BIAS);
    int32_t *s_facts = reinterpret_cast<int32_t *>(smem + L::OFF_FACTS);
    int32_t *s_count = reinterpret_cast<int32_t *>(smem + L::OFF_COUNT);
    uint8_t *s_kind = smem + L::OFF_KIND;

    const uint16_t *kbase = a.k + br.b * a.k_sb + br.hk * a.k_sh + (int64_t)br.k_start * a.k_st;
    const uint16_t *vbase = a.v + br.b * a.v_sb + br.hk * a.v_sh + (int64_t)br.k_start * a.v_st;
    /* the rows of the chunks in `seen`; rows past kv_len become zeros, never read */
    auto issue_kv = [&](int j, int st, unsigned seen) {
        const uint32_t sk = spipe + st * L::STAGE, sv = sk + L::TILE;
        load_tile<BN, D, THREADS, true>(sk, kbase + (int64_t)j * BN * a.k_st, a.k_st,
                                        br.kv_len - j * BN, tid, seen);
        load_tile<BN, D, THREADS, true>(sv, vbase + (int64_t)j * BN * a.v_st, a.v_st,
                                        br.kv_len - j * BN, tid, seen);
    };

    /* The segment table goes first: the plan waits for it, while the diagonal tile's K/V
     * and Q, issued next, are needed only after the plan. */
    SegView view = view_of_range(a.seg_end, a.seg_kind, a.seg_bias, seg);
    const TableEntry entry = prefetch_table(view, SEG_CAP, tid);
    /* the diagonal tile's chunks up to the last row's key: no row sees a later key */
    issue_kv(br.jlast, 0, (2u << ((br.p1 - br.jlast * BN) / 16)) - 1u);
    cp_async_commit();

    /* Q fragments of rows g and g + 8, straight from global memory in the mma A layout
     * (register r: row g + 8 * (r & 1), columns 8 * (r >> 1) + 2 * c4, +1); rows past
     * q_len are zeros and never read. All four warps load the same rows. */
    uint32_t qf[D / 16][4];
    {
        const uint16_t *qbase =
            a.q + br.b * a.q_sb + br.h * a.q_sh + (int64_t)(br.q_start + br.i0 + g) * a.q_st;
        const uint16_t *const qrow[2] = {qbase, qbase + 8 * a.q_st};
        const bool valid[2] = {br.i0 + g < br.q_len, br.i0 + g + 8 < br.q_len};
        load_q_fragments<D>(qf, qrow, valid);
    }

    /* The sequence's segment table, staged in shared memory when small. */
    stage_table<THREADS>(view, SEG_CAP, s_end, s_kind, s_bias, tid, entry);
    __syncthreads();
    /* Per-key facts of a partial tile, by the last BN threads: warp 0 plans meanwhile. */
    auto write_facts = [&](int j, int st) {
        const int col = tid - (THREADS - BN);
        if (col >= 0) {
            int32_t *fseg = s_facts + st * 2 * BN;
            key_facts(view, j * BN + col, &fseg[col], reinterpret_cast<float *>(fseg + BN) + col);
        }
    };
    write_facts(br.jlast, 0);

    RowFacts rows;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        rows.pos[r] = br.p0 + g + r * 8;
        rows.seg[r] = view.seg(rows.pos[r]);
        rows.glob[r] = view.kind_of(rows.seg[r]) == SF_GLOBAL;
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    int n0 = 0; /* tiles of the earlier rounds: step i of a round uses stage (n0 + i) % NSTAGE */

    /* Rounds of at most PLAN_CAP candidate tiles, from the diagonal down to tile 0. */
    for (int jtop = br.jlast + 1; jtop > 0; jtop -= PLAN_CAP) {
        const int jbase = max(0, jtop - PLAN_CAP);
        const int nplan =
            plan_chunks(view, br.p0, br.p1, br.kv_len, jbase, jtop - jbase, s_plan, s_count, tid);
        /* step i takes plan entry nplan - 1 - i: the plan is ascending, the steps descend */
        auto fetch = [&](int i) {
            const uint32_t e = s_plan[nplan - 1 - i];
            const int j = (int)(e & TILE_BITS), st = (n0 + i) % NSTAGE;
            const unsigned seen = (e >> SEEN_SHIFT) & 15u, full = (e >> FULL_SHIFT) & 15u;
            issue_kv(j, st, seen);
            if (seen & ~full) write_facts(j, st); /* full chunks need no facts */
        };
        /* NSTAGE - 1 steps in flight before the first is computed (one cp.async group per
         * step, empty past the plan's end, so the group count stays in step); step 0 of
         * the first round is the diagonal tile, already on its way. */
        for (int i = jtop == br.jlast + 1 ? 1 : 0; i < NSTAGE - 1; ++i) {
            if (i < nplan) fetch(i);
            cp_async_commit();
        }

        for (int i = 0; i < nplan; ++i) {
            cp_async_wait<NSTAGE - 2>(); /* this thread's copies of step i landed */
            __syncthreads(); /* everyone's landed, and everyone is done with step i - 1 */
            if (i + NSTAGE - 1 < nplan) fetch(i + NSTAGE - 1); /* into step i - 1's stage */
            cp_async_commit();

            const uint32_t e = s_plan[nplan - 1 - i];
            const int st = (n0 + i) % NSTAGE;
            const uint32_t sk = spipe + st * L::STAGE, sv = sk + L::TILE;
            if ((e >> (FULL_SHIFT + warp)) & 1u) {
                attend_chunk<T, D, CpAsyncTile<D>, 2>(sk, sv, warp, FullTileMask{a.scale_log2}, qf,
                                                      m, l, o);
            } else if ((e >> (SEEN_SHIFT + warp)) & 1u) {
                const int32_t *fseg = s_facts + st * 2 * BN;
                const PartialTileMask mask{fseg, reinterpret_cast<const float *>(fseg + BN),
                                           (int)(e & TILE_BITS) * BN, rows, a.scale_log2};
                attend_chunk<T, D, CpAsyncTile<D>, 2>(sk, sv, warp, mask, qf, m, l, o);
            } /* else no row of the block sees the warp's chunk of this tile */
        }
        n0 += nplan;
        __syncthreads(); /* the plan buffer and the stages are rewritten by the next round */
    }
    cp_async_wait<0>(); /* only empty groups remain; the stages become the merge area */
    __syncthreads();

    /* Warp w holds keys 16w..16w+15 of every tile. The four states are merged through
     * shared memory, each warp merging and writing a quarter of the columns. */
    float mo[D / 32][4];
    merge_warps_by_columns<D>(reinterpret_cast<float *>(smem), warp, lane, m, l, o, mo);

    /* epilogue: normalise and write the valid rows */
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = br.i0 + g + r * 8;
        if (i >= br.q_len) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        uint16_t *orow = a.out + br.b * a.o_sb + br.h * a.o_sh +
                         (int64_t)(br.q_start + i) * a.o_st + warp * (D / 4);
#pragma unroll
        for (int n = 0; n < D / 32; ++n) {
            const uint32_t pk = Pack2<T>::pack(mo[n][2 * r] * inv, mo[n][2 * r + 1] * inv);
            *reinterpret_cast<uint32_t *>(orow + n * 8 + 2 * c4) = pk;
        }
        if (a.lse != nullptr && warp == 0 && c4 == 0)
            a.lse[br.b * a.lse_sb + br.h * a.lse_sh + br.q_start + i] =
                l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
}

template <typename T, int D>
sf_status launch(const PrefillArgs &a, int heads_q, int batch, int max_q_len, cudaStream_t stream)
{
    constexpr int bytes = Layout<D>::BYTES;
    static unsigned long long configured = 0; /* MIN_BLOCKS blocks per SM need the carveout */
    if (!configure_once((const void *)prefill_small_kernel<T, D>, bytes, &configured, true))
        return SF_ERR_CUDA;
    dim3 grid(heads_q, (max_q_len + BM - 1) / BM, batch);
    prefill_small_kernel<T, D><<<grid, THREADS, bytes, stream>>>(a);
    return last_launch_status();
}

} // namespace

sf_status launch_prefill_small(const PrefillArgs &a, bool bf16, int head_dim, int heads_q,
                               int batch, int max_q_len, cudaStream_t stream)
{
    if (head_dim == 64)
        return bf16 ? launch<__nv_bfloat16, 64>(a, heads_q, batch, max_q_len, stream)
                    : launch<__half, 64>(a, heads_q, batch, max_q_len, stream);
    return bf16 ? launch<__nv_bfloat16, 128>(a, heads_q, batch, max_q_len, stream)
                : launch<__half, 128>(a, heads_q, batch, max_q_len, stream);
}

} // namespace sfcuda

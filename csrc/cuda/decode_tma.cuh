/*
 * decode_tma.cuh - the decode kernel that streams K/V with the tensor copy engine (TMA)
 * and merges its splits itself (included by decode.cu, which holds DecodeArgs, the old
 * kernel and the entry points).
 *
 * What differs from decode_kernel (decode.cu):
 *
 *  - A full tile of 64 keys arrives by cp.async.bulk.tensor: one instruction per 64 rows x
 *    64 columns box (4 per tile at d = 128: K and V, two column halves each), issued by one
 *    thread, swizzled by the engine (16-byte chunk c of row r lands at chunk c ^ (r % 8) of
 *    its 128-byte line, so the 8 rows an ldmatrix reads fall in distinct banks), completing
 *    on an mbarrier per pipeline stage with a byte count. The copy engine, not the
 *    load/store unit, tracks the bytes in flight. The box never leaves the split's keys, so
 *    no key at or past kv_len is read. The one partial tile a sequence can have (its last)
 *    comes by cp.async into the same swizzled layout, rows past kv_len zero-filled.
 *  - Keys are dealt to splits a tile at a time, evenly, from the device-side cache length:
 *    at 2k keys and batch 1 each of the 256 blocks gets one tile, so the chain of dependent
 *    steps in a block is one tile long.
 *  - The splits of a row group are merged by the block that finishes last (an arrival
 *    counter per row group, merge_if_last in decode.cu): no second kernel, and at large
 *    caches the merge of one head overlaps the streaming of the others.
 *  - The grid is a programmatic dependent of the previous kernel in the stream: it is
 *    scheduled while that kernel drains and waits (griddepcontrol.wait) before its first
 *    access to global memory.
 *  - A block of at most 8 query rows (3 heads x 1 token at 24 / 8 heads) puts the keys on
 *    the M side of its products (attend_chunk_narrow, key_split.cuh): half the mma.sync
 *    instructions. The tensor cores are not the limit here, but the block's work between
 *    a tile's arrival and the refill of its stage is: on an H100, a build that skipped the
 *    products altogether ran 32 x 2k in 89.5-90.0 us against 91.5-91.7, and with the
 *    narrow products 32 x 2k measured 91.0-91.5 against SDPA's 91.3-91.7 (five rounds).
 *
 * The tensor maps describe K and V as 2-D [rows, D] arrays of 16-bit elements: row
 * b*stride_b/stride_t + h*stride_h/stride_t + k_start + key holds key `key` of sequence b,
 * head h. The host builds them per call (their addresses and strides are baked into a
 * captured graph like any kernel argument).
 */
#include <cuda.h> /* CUtensorMap and its enums only; the encoder comes from the runtime */

namespace sfcuda {
namespace {

constexpr int TM_THREADS = 128;
/* Two stages: a tile in flight while the block works on the one before. Against three on
 * an H100 (eight timings each over two runs, SDPA in the same processes), 32 x 2k took
 * 91.5-91.8 us against 92.0-92.6. Two blocks per multiprocessor with two 32 KB tiles in flight each
 * already keep the memory busy; why the third stage cost time is not known. */
constexpr int TM_STAGES = 2;
constexpr int TM_SEG_CAP = 1024;
constexpr int TM_BOX = 64;             /* box: 64 rows x 64 columns (128 bytes, one swizzle span) */
constexpr int TM_HALF = TM_BOX * 128;  /* bytes of one box in shared memory */

template <int D> __host__ __device__ constexpr int tm_kv_bytes() { return BN * D * 2; } /* K or V tile */
template <int D> __host__ __device__ constexpr int tm_stage() { return 2 * tm_kv_bytes<D>(); }
/* 1024 bytes of slack to align the stages (the swizzle pattern follows address bits 4-9) |
 * stages | per-stage key biases | segment table (ends, biases) | one mbarrier per stage */
template <int D> __host__ __device__ constexpr int tm_off_bias() { return TM_STAGES * tm_stage<D>(); }
template <int D> __host__ __device__ constexpr int tm_off_seg() { return tm_off_bias<D>() + TM_STAGES * BN * 4; }
template <int D> __host__ __device__ constexpr int tm_off_bar() { return tm_off_seg<D>() + TM_SEG_CAP * 8; }
template <int D> __host__ __device__ constexpr int tm_smem() { return 1024 + tm_off_bar<D>() + TM_STAGES * 8 + 8; }
static_assert(tm_smem<128>() <= (233472 - 2 * 1024) / 2 - 128, "two blocks per multiprocessor");
static_assert(merge_warps_bytes<128>() + 4 * narrow_bytes<128>() <= TM_STAGES * tm_stage<128>() &&
                  merge_warps_bytes<64>() + 4 * narrow_bytes<64>() <= TM_STAGES * tm_stage<64>(),
              "warp merge areas fit");
static_assert(tm_off_bar<64>() % 8 == 0 && tm_off_bar<128>() % 8 == 0, "mbarrier alignment");

/* Shared-memory offset of 16-byte chunk `ch` (of D/8) of row `row` in a K or V tile: column
 * half ch / 8 is one 64-row box, each row one 128-byte line, chunks permuted as the copy
 * engine's 128-byte swizzle places them. */
__device__ __forceinline__ uint32_t tm_off(int row, int ch)
{
    return (uint32_t)((ch >> 3) * TM_HALF + row * 128 + (((ch & 7) ^ (row & 7)) << 4));
}

struct TmaTile {
    static __device__ __forceinline__ uint32_t off(int row, int ch) { return tm_off(row, ch); }
};

/* ------------------------------------------------------------ mbarrier / tensor copies
 * (init, arrive and wait are in common.cuh) */

/* One arrival that also announces `bytes` to be delivered by copies into this phase. */
__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}


/* One box (64 columns from column c0, 64 rows from row r0) of a 2-D tensor map into shared
 * memory at dst (1024-byte aligned); completion counted in bytes on the mbarrier. The lines
 * are marked first to leave L2: a decode step reads each cached byte once, and the weights
 * and activations around it are worth keeping. (On an H100 the hint measured 0-0.3 us faster
 * at 32 x 2k, never slower.) */
__device__ __forceinline__ void tma_box(uint32_t dst, const CUtensorMap *map, int c0, int r0,
                                        uint32_t bar)
{
    asm volatile(
        "{\n"
        ".reg .b64 policy;\n"
        "createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        ".L2::cache_hint [%0], [%1, {%2, %3}], [%4], policy;\n"
        "}\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(bar)
        : "memory");
}

__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap *map)
{
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

/* ------------------------------------------------------------------------ the kernel */

/* Row offsets of the tensor maps: row of key 0 of (b, h) is b * rb + h * rh + k_start[b]. */
struct TmaRows {
    int64_t k_rb, k_rh, v_rb, v_rh;
};

template <typename T, int D>
__global__ void __launch_bounds__(TM_THREADS, 2)
    decode_tma_kernel(const DecodeArgs a, const TmaRows rows_of, const __grid_constant__ CUtensorMap kmap,
                      const __grid_constant__ CUtensorMap vmap)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 /* the copy engine and mbarriers; launched on sm_90 only */
    extern __shared__ __align__(1024) uint8_t smem_raw[];

    /* the maps are kernel parameters, not data of an earlier kernel: fetch them early */
    if (threadIdx.x == 0) {
        tma_prefetch_map(&kmap);
        tma_prefetch_map(&vmap);
    }
    /* Launched as a programmatic dependent: everything read or written below may belong to
     * the previous kernel of the stream (the new K/V rows, the lengths), so wait for it
     * before the first global access. (No-op for an ordinary launch.) */
    grid_dependency_wait();

    /* stages 1024-byte aligned, whatever the alignment of the dynamic area */
    const uint32_t raw_addr = smem_addr(smem_raw);
    uint8_t *smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
    const uint32_t sbase = smem_addr(smem);

    const int split = blockIdx.x;
    const int hk = blockIdx.y / a.row_chunks, rc = blockIdx.y % a.row_chunks;
    const int b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;

    const int q_len = a.q_len[b], kv_len = a.kv_len[b];
    const int q_start = a.q_start[b], k_start = a.k_start[b];
    int rows, rg_count, kg_count, rg, kg;
    warp_groups(a, rc, warp, rows, rg_count, kg_count, rg, kg);

    /* this split's tiles: [t0, t1) of the sequence's ceil(kv_len / BN), dealt evenly */
    const int ntiles_all = (kv_len + BN - 1) / BN;
    const int t0 = (int)((int64_t)split * ntiles_all / a.nsplit);
    const int t1 = (int)((int64_t)(split + 1) * ntiles_all / a.nsplit);
    const int kbeg = t0 * BN;
    const int kend = min(t1 * BN, kv_len);

    /* this thread's two rows */
    int hrow[2], trow[2], pos[2];
    bool valid[2];
    thread_rows(a, hk, rc, rg * 16 + g, rows, q_len, kv_len, hrow, trow, pos, valid);
    /* A block of at most 8 rows takes the narrow products (key_split.cuh), whose lanes hold
     * rows 2 * c4 and 2 * c4 + 1: their positions for the mask. */
    const bool narrow = rows <= 8;
    int npos[2];
    {
        int nh[2], nt[2];
        bool nv[2];
        thread_rows(a, hk, rc, 2 * c4, rows, q_len, kv_len, nh, nt, npos, nv, 1);
    }

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    /* the narrow state's output lives in the first half of o */
    float(&o_narrow)[D / 16][4] = *reinterpret_cast<float(*)[D / 16][4]>(&o[0][0]);

    constexpr int STAGE = tm_stage<D>();
    constexpr int KVB = tm_kv_bytes<D>();
    float *s_kbias = reinterpret_cast<float *>(smem + tm_off_bias<D>()); /* [stage][BN] */
    int32_t *s_end = reinterpret_cast<int32_t *>(smem + tm_off_seg<D>());
    float *s_sbias = reinterpret_cast<float *>(s_end + TM_SEG_CAP);
    const uint32_t s_bar = sbase + tm_off_bar<D>();
    int *s_last = reinterpret_cast<int *>(smem + tm_off_bar<D>() + TM_STAGES * 8);

    if (kbeg < kend) {
        const int nkeys = kend - kbeg;
        const int ntiles = t1 - t0;
        /* only a sequence's last tile can hold fewer than BN keys */
        const bool last_partial = nkeys - (ntiles - 1) * BN < BN;
        const int64_t krow0 = b * rows_of.k_rb + hk * rows_of.k_rh + k_start + kbeg;
        const int64_t vrow0 = b * rows_of.v_rb + hk * rows_of.v_rh + k_start + kbeg;

        /* Tile t goes to stage t % TM_STAGES. Called by every thread. A full tile gets warp
         * 0's 32 arrivals (lane 0's announcing the bytes to come) and lane 0's box copies.
         * The partial last tile is copied by all threads with cp.async (zero-filled past
         * kend) and waited for with cp.async.wait_all. */
        auto copy = [&](int t) {
            const int st = t % TM_STAGES;
            const uint32_t sk = sbase + st * STAGE, sv = sk + KVB;
            if (!(last_partial && t == ntiles - 1)) {
                if (warp == 0) {
                    const uint32_t bar = s_bar + 8 * st;
                    if (lane == 0) mbar_arrive_expect(bar, (uint32_t)(2 * KVB));
                    else mbar_arrive(bar);
                    if (lane == 0) {
                        const int kr = (int)(krow0 + (int64_t)t * BN);
                        const int vr = (int)(vrow0 + (int64_t)t * BN);
#pragma unroll
                        for (int h = 0; h < D / 64; ++h) {
                            tma_box(sk + h * TM_HALF, &kmap, h * 64, kr, bar);
                            tma_box(sv + h * TM_HALF, &vmap, h * 64, vr, bar);
                        }
                    }
                }
            } else {
                constexpr int CH = D / 8;
                const int nrows = nkeys - t * BN;
                const uint16_t *ksrc = a.k + b * a.k_sb + hk * a.k_sh + (int64_t)(k_start + kbeg + t * BN) * a.k_st;
                const uint16_t *vsrc = a.v + b * a.v_sb + hk * a.v_sh + (int64_t)(k_start + kbeg + t * BN) * a.v_st;
#pragma unroll
                for (int i = 0; i < BN * CH / TM_THREADS; ++i) {
                    const int idx = tid + i * TM_THREADS;
                    const int row = idx / CH, ch = idx % CH;
                    const bool ok = row < nrows;
                    const uint32_t off = tm_off(row, ch);
                    cp_async16(sk + off, ok ? ksrc + (int64_t)row * a.k_st + ch * 8 : ksrc, ok);
                    cp_async16(sv + off, ok ? vsrc + (int64_t)row * a.v_st + ch * 8 : vsrc, ok);
                }
                cp_async_commit();
            }
        };

        /* The first tiles depend on the lengths alone: they start before Q and the segment
         * table are loaded. Warp 0 initialises the barriers it arrives on. */
        if (warp == 0) {
            if (lane == 0) {
#pragma unroll
                for (int s = 0; s < TM_STAGES; ++s) mbar_init(s_bar + 8 * s, 32); /* warp 0 */
                /* the barriers' initial state must be visible to the copy engine */
                asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
            }
            __syncwarp();
        }
#pragma unroll
        for (int t = 0; t < TM_STAGES - 1; ++t)
            if (t < ntiles) copy(t);

        /* Q fragments straight from global memory (rows padded with zeros) */
        uint32_t qf[D / 16][4];
        q_fragments_global<D>(a, b, q_start, hrow, trow, valid, c4, qf);

        /* per-key biases: segment table staged in shared memory when small */
        SegView view = make_view(a.seg_ptr, a.seg_end, a.seg_kind, a.seg_bias, b);
        const bool has_bias = view.bias != nullptr && view.n > 0;
        if (has_bias && view.n <= TM_SEG_CAP) {
            stage_ends_biases<TM_THREADS>(view, s_end, s_sbias, tid);
            __syncthreads(); /* warp 0 looks up the whole staged table just below */
        }

        /* Warp 0 writes the per-key biases of tile t's stage. */
        auto write_biases = [&](int t) {
            if (has_bias && warp == 0) {
                const int st = t % TM_STAGES;
#pragma unroll
                for (int i = 0; i < BN / 32; ++i) {
                    const int col = lane + 32 * i;
                    const int key = kbeg + t * BN + col;
                    s_kbias[st * BN + col] = key < kend ? view.bias_of(view.seg(key)) * kLog2e : 0.f;
                }
            }
        };
        /* The first tiles' biases are visible to every warp through this barrier; a later
         * tile's are written before warp 0's arrivals on its stage (each a release), so they
         * are visible to whoever waits for the phase. */
#pragma unroll
        for (int t = 0; t < TM_STAGES - 1; ++t)
            if (t < ntiles) write_biases(t);
        __syncthreads(); /* barriers initialised, staged table and first biases visible */
        auto issue = [&](int t) {
            write_biases(t);
            copy(t);
        };

        for (int t = 0; t < ntiles; ++t) {
            if (t + TM_STAGES - 1 < ntiles) {
                /* every warp is done with tile t-1, whose stage the next tile refills */
                __syncthreads();
                issue(t + TM_STAGES - 1);
            }
            const int st = t % TM_STAGES;
            if (last_partial && t == ntiles - 1) {
                cp_async_wait<0>();
                __syncthreads(); /* every thread's rows (and warp 0's biases) landed */
            } else {
                mbar_wait(s_bar + 8 * st, (uint32_t)((t / TM_STAGES) & 1));
            }

            const uint32_t sk = sbase + st * STAGE, sv = sk + KVB;
            const float *kb = s_kbias + st * BN;
            if (narrow) {
                const DecodeMask mask{npos, kbeg + t * BN, kend, kb, has_bias, a.scale_log2};
                for (int cchunk = kg; cchunk < BN / 16; cchunk += kg_count)
                    attend_chunk_narrow<T, D, TmaTile>(sk, sv, cchunk, mask, qf, m, l, o_narrow);
            } else {
                const DecodeMask mask{pos, kbeg + t * BN, kend, kb, has_bias, a.scale_log2};
                for (int cchunk = kg; cchunk < BN / 16; cchunk += kg_count)
                    attend_chunk<T, D, TmaTile, 4>(sk, sv, cchunk, mask, qf, m, l, o);
            }
        }
        /* every issued tile has been waited for: no copy is still writing shared memory */
    }
    __syncthreads(); /* the pipeline buffers become the merge area */
    if (narrow)
        narrow_to_rows<D>(reinterpret_cast<float *>(smem + merge_warps_bytes<D>() + warp * narrow_bytes<D>()),
                          lane, m, l, o);

    /* merge the warps that share rows (same rg, different key shares) into kg == 0 */
    merge_warps<D>(reinterpret_cast<float *>(smem), warp, lane, kg, kg_count, rg_count, m, l, o);

    /* write: the final result (one split) or this split's partial result */
    if (kg == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (valid[r]) write_row<T, D>(a, r, hrow[r], trow[r], b, q_start, split, c4, m, l, o);
    }
    if (a.nsplit == 1) return; /* uniform over the grid */

    /* the block that completes its row group merges the group's splits */
    merge_if_last<T, D>(a, rows, rc, hk, b, q_len, q_start, s_last);
#endif
}

/* --------------------------------------------------------------------------- host */

/* Whether the current device runs the kernel above (sm_90: the copy engine; the builds
 * carry it for sm_90a only, and it is empty for older devices). */
inline bool device_has_tma()
{
    bool sm90 = false;
    device_sms(&sm90);
    return sm90;
}

/* Splits per row group: about two blocks per multiprocessor in one wave, never more splits
 * than 64-key tiles (when max_kv_len > 0), one split when the row groups alone fill the
 * chip or a launch would need too many arrival counters. */
int tma_splits(int batch, const sf_attn_params *p, int max_q, int max_kv_len)
{
    const int64_t groups = (int64_t)batch * p->heads_kv * row_chunks(p, max_q);
    if (groups > TM_POOL / 4) return 1;
    const int64_t slots = 2 * (int64_t)sm_count();
    int64_t s = (slots + groups / 2) / groups;
    if (s > MAX_SPLITS) s = MAX_SPLITS;
    if (max_kv_len > 0) {
        const int64_t tiles = ((int64_t)max_kv_len + BN - 1) / BN;
        if (s > tiles) s = tiles;
    }
    return s < 1 ? 1 : (int)s;
}

typedef CUresult (*EncodeTiledFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                  const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                  const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* The driver's tensor-map encoder, looked up once through the runtime (no link to libcuda). */
EncodeTiledFn encode_tiled()
{
    static EncodeTiledFn fn = [] {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                             &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            p = nullptr;
        }
        return reinterpret_cast<EncodeTiledFn>(p);
    }();
    return fn;
}

/*
 * The 2-D map of K or V: rows of D 16-bit elements, stride_t apart. Heads and sequences are
 * found by row offsets (stride_h / stride_t, stride_b / stride_t), so the strides must be
 * whole multiples of stride_t, and every row touched must have an index below 2^31.
 * Returns false when the tensor does not fit this description.
 */
bool make_kv_map(CUtensorMap *map, const void *data, int64_t st, int64_t sh, int64_t sb, int batch,
                 int heads_kv, int D, int64_t *rb, int64_t *rh)
{
    EncodeTiledFn enc = encode_tiled();
    if (enc == nullptr || st < D || sh < 0 || sb < 0 || sh % st != 0 || sb % st != 0) return false;
    *rh = sh / st;
    *rb = sb / st;
    /* rows of the last head of the last sequence start below 2^30, its keys below 2^30 more */
    const int64_t last = (int64_t)(batch - 1) * *rb + (int64_t)(heads_kv - 1) * *rh;
    if (last >= (1ll << 30)) return false;
    const int64_t max_rows = (1ll << 31) - 1;
    const int64_t fit_rows = (1ll << 40) / (st * 2);
    cuuint64_t dims[2] = {(cuuint64_t)D, (cuuint64_t)(fit_rows < max_rows ? fit_rows : max_rows)};
    cuuint64_t strides[1] = {(cuuint64_t)(st * 2)};
    cuuint32_t box[2] = {(cuuint32_t)TM_BOX, (cuuint32_t)TM_BOX};
    cuuint32_t estr[2] = {1, 1};
    return enc(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void *>(data), dims, strides, box,
               estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* Launches decode_tma_kernel; returns SF_ERR_ARGUMENT, having launched nothing, when the
 * device has no copy engine or K or V cannot be described by a tensor map (the caller then
 * takes the old kernel, unless SEGFLEX_DECODE_IMPL=new asked for this one). */
template <typename T, int D>
sf_status launch_tma(DecodeArgs a, int heads_kv, int batch, cudaStream_t stream)
{
    if (!device_has_tma()) return SF_ERR_ARGUMENT;
    alignas(64) CUtensorMap kmap, vmap;
    TmaRows rows;
    if (!make_kv_map(&kmap, a.k, a.k_st, a.k_sh, a.k_sb, batch, heads_kv, D, &rows.k_rb, &rows.k_rh) ||
        !make_kv_map(&vmap, a.v, a.v_st, a.v_sh, a.v_sb, batch, heads_kv, D, &rows.v_rb, &rows.v_rh))
        return SF_ERR_ARGUMENT;

    constexpr int bytes = tm_smem<D>();
    static unsigned long long configured = 0;
    if (!configure_once((const void *)decode_tma_kernel<T, D>, bytes, &configured))
        return SF_ERR_CUDA;
    const int groups = heads_kv * a.row_chunks * batch;
    a.ctr_base = a.nsplit > 1 ? take_counters(groups) : 0;
    return launch_dependent(decode_tma_kernel<T, D>, dim3(a.nsplit, heads_kv * a.row_chunks, batch),
                            dim3(TM_THREADS), bytes, stream, a, rows, kmap, vmap);
}

} // namespace
} // namespace sfcuda

/*
 * prefill.cu - segment-masked attention over whole sequences (sf_cuda_attention):
 * the mma.sync kernel, and the entry point that picks one of the three prefill kernels.
 *
 * One block of 4 warps takes 64 query rows of one head of one sequence; each
 * warp owns 16 rows. Keys come in tiles of 64. Before touching K/V the block
 * classifies every key tile that lies at or before its last query, straight
 * from the segment table (plan.cuh): empty tiles never enter the plan (never loaded),
 * full tiles run without any mask arithmetic, partial tiles evaluate the mask
 * and the bias in registers from per-key segment ids computed on the fly.
 * Q K^T and P V run on mma.sync m16n8k16 with fp32 accumulators; the softmax
 * is online, in fp32, in base 2. K and V of the query head's KV head are read
 * in place (GQA of any ratio, no copy).
 *
 * The kernels (same plan, same semantics; prefill.cuh lists them):
 *   small  prefill_small.cu: 16 rows per block, each tile's keys dealt to the 4 warps.
 *          Taken when this kernel's grid would not fill the GPU (fewer than two 64-row
 *          blocks per SM): there the time is the chain of the block with the most tiles.
 *   wgmma  prefill_sm90.cu: sm_90 and head dim 128, sequences of at least 512 queries
 *          and at least one of its 128-row blocks per SM.
 *   mma    this file: everything else.
 * SEGFLEX_PREFILL_IMPL=mma|wgmma|small|auto (read once per process) forces one kernel
 * wherever it can run, for A/B runs; use_small and use_sm90 below hold the rules.
 * SEGFLEX_PREFILL_GRID=n caps the wgmma kernel's persistent grid at n blocks, so that
 * tests of small problems make every block walk through many items (their boundaries are
 * where the producer and the consumers overlap two items).
 */
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "plan.cuh"
#include "prefill.cuh"

namespace sfcuda {
namespace {

constexpr int BM = 64;          /* query rows per block */
constexpr int BN = 64;          /* keys per tile */
constexpr int THREADS = 128;    /* 4 warps x 16 rows */
constexpr int PLAN_CAP = 1024;  /* key tiles classified per planning round */
constexpr int SEG_CAP = 1024;   /* segment tables up to this size are staged in shared memory */

template <int D> constexpr int smem_bytes()
{
    return BM * D * 2 + 4 * BN * D * 2 + PLAN_CAP * 4 + SEG_CAP * 9 + 2 * BN * 12 + 16 * 4;
}

/* Per-key facts of a partial tile for the mask: segment (-1 for shared keys), bias (base 2). */
struct KeyFacts {
    int32_t *seg;
    float *bias;
};

template <typename T, int D>
__global__ void __launch_bounds__(THREADS, 2) prefill_kernel(const PrefillArgs a)
{
    extern __shared__ __align__(128) uint8_t smem[];
    BlockRows br;
    SegRange seg;
    if (!block_rows<BM, BN>(a, br, seg)) return;
    const int h = br.h, b = br.b, hk = br.hk, i0 = br.i0, p0 = br.p0, p1 = br.p1;
    const int q_len = br.q_len, kv_len = br.kv_len, q_start = br.q_start, k_start = br.k_start;
    const int jlast = br.jlast;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;

    /* shared memory: Q | K0 V0 | K1 V1 | plan | segment table | key facts x2 | counts */
    uint8_t *s_q = smem;
    uint8_t *s_kv = s_q + BM * D * 2;
    uint32_t *s_plan = reinterpret_cast<uint32_t *>(s_kv + 4 * BN * D * 2);
    int32_t *s_end = reinterpret_cast<int32_t *>(s_plan + PLAN_CAP);
    float *s_bias = reinterpret_cast<float *>(s_end + SEG_CAP);
    uint8_t *s_kind = reinterpret_cast<uint8_t *>(s_bias + SEG_CAP);
    int32_t *s_facts = reinterpret_cast<int32_t *>(s_kind + SEG_CAP); /* [2][3][BN] */
    int32_t *s_count = s_facts + 2 * 3 * BN;
    auto facts = [&](int st) {
        KeyFacts f;
        f.seg = s_facts + st * 3 * BN;
        f.bias = reinterpret_cast<float *>(f.seg + BN);
        return f;
    };

    const uint32_t sq = smem_addr(s_q), skv = smem_addr(s_kv);
    const uint16_t *kbase = a.k + b * a.k_sb + hk * a.k_sh + (int64_t)k_start * a.k_st;
    const uint16_t *vbase = a.v + b * a.v_sb + hk * a.v_sh + (int64_t)k_start * a.v_st;
    auto issue_kv = [&](int j, int st) {
        uint32_t sk = skv + st * (2 * BN * D * 2), sv = sk + BN * D * 2;
        load_tile<BN, D, THREADS>(sk, kbase + (int64_t)j * BN * a.k_st, a.k_st, kv_len - j * BN,
                                  tid);
        load_tile<BN, D, THREADS>(sv, vbase + (int64_t)j * BN * a.v_st, a.v_st, kv_len - j * BN,
                                  tid);
    };

    /* Q and the diagonal tile's K/V start flowing before anything else is known. */
    const uint16_t *qbase = a.q + b * a.q_sb + h * a.q_sh + (int64_t)(q_start + i0) * a.q_st;
    load_tile<BM, D, THREADS>(sq, qbase, a.q_st, q_len - i0, tid); /* rows past q_len: zeros */
    issue_kv(jlast, 0);
    cp_async_commit();

    /* The sequence's segment table, staged in shared memory when small. */
    SegView view = view_of_range(a.seg_end, a.seg_kind, a.seg_bias, seg);
    stage_table<THREADS>(view, SEG_CAP, s_end, s_kind, s_bias, tid);
    __syncthreads();
    auto write_facts = [&](int j, int st) {
        if (tid < BN) {
            KeyFacts f = facts(st);
            key_facts(view, j * BN + tid, &f.seg[tid], &f.bias[tid]);
        }
    };
    write_facts(jlast, 0);

    /* Per-row segment facts of this thread's two rows (g and g + 8 of its warp). */
    int qpos[2], qseg[2];
    bool qglob[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        qpos[r] = p0 + warp * 16 + g + r * 8;
        qseg[r] = view.seg(qpos[r]);
        qglob[r] = view.kind_of(qseg[r]) == SF_GLOBAL;
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    uint32_t qf[D / 16][4];
    bool q_in_regs = false;
    int st = 0; /* stage of the tile processed next */

    /* Rounds of at most PLAN_CAP candidate tiles, from the diagonal down to tile 0. */
    for (int jtop = jlast + 1; jtop > 0; jtop -= PLAN_CAP) {
        const int jbase = max(0, jtop - PLAN_CAP);
        const int ncand = jtop - jbase;
        /* ---- plan: classify candidate tiles, keep the non-empty ones in order */
        const int nplan =
            plan_round<BN, THREADS>(view, p0, p1, kv_len, jbase, ncand, s_plan, s_count, tid);
        if (nplan == 0) continue;
        if (jtop != jlast + 1) { /* later rounds: the first tile was not fetched yet */
            uint32_t e = s_plan[nplan - 1];
            int j = (int)(e & ~FULL_BIT);
            issue_kv(j, st);
            cp_async_commit();
            if (!(e & FULL_BIT)) write_facts(j, st);
        }

        /* ---- the tiles, last first; the next one loads while this one computes */
        for (int it = nplan - 1; it >= 0; --it, st ^= 1) {
            const uint32_t e = s_plan[it];
            const int j = (int)(e & ~FULL_BIT);
            const bool full = (e & FULL_BIT) != 0;
            __syncthreads(); /* everyone is done with the other stage */
            if (it > 0) {
                const uint32_t en = s_plan[it - 1];
                const int jn = (int)(en & ~FULL_BIT);
                issue_kv(jn, st ^ 1);
                if (!(en & FULL_BIT)) write_facts(jn, st ^ 1); /* full tiles need no facts */
            }
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads(); /* this tile (and Q) landed and is visible */

            if (!q_in_regs) {
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    int row = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                    int chunk = kk * 2 + (lane >> 4);
                    ldsm_x4(qf[kk], sq + tile_off<D>(row, chunk));
                }
                q_in_regs = true;
            }
            const uint32_t sk = skv + st * (2 * BN * D * 2), sv = sk + BN * D * 2;

            /* S = Q K^T for this warp's 16 rows x 64 keys */
            float s[BN / 8][4];
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    uint32_t bf[4];
                    int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
                    int chunk = kk * 2 + ((lane >> 3) & 1);
                    ldsm_x4(bf, sk + tile_off<D>(key, chunk));
                    mma16816<T>(s[2 * np], qf[kk], bf[0], bf[1]);
                    mma16816<T>(s[2 * np + 1], qf[kk], bf[2], bf[3]);
                }
            }

            /* scale, mask and bias (partial tiles only), in base 2 */
            if (full) {
#pragma unroll
                for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                    for (int x = 0; x < 4; ++x) s[n][x] *= a.scale_log2;
            } else {
                const KeyFacts f = facts(st);
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        int col = n * 8 + 2 * c4 + (x & 1);
                        int r = x >> 1;
                        int key = j * BN + col;
                        const int ks = f.seg[col];
                        bool ok = key <= qpos[r] && (qglob[r] || ks == qseg[r] || ks < 0);
                        float bias = qglob[r] ? f.bias[col] : 0.f;
                        s[n][x] = ok ? s[n][x] * a.scale_log2 + bias : -INFINITY;
                    }
                }
            }

            /* online softmax */
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
                online_softmax_row(s, r, quad_max(mx), m[r], l[r], alpha[r]);
            }
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[i][0] *= alpha[0];
                o[i][1] *= alpha[0];
                o[i][2] *= alpha[1];
                o[i][3] *= alpha[1];
            }

            /* O += P V */
#pragma unroll
            for (int kt = 0; kt < BN / 16; ++kt) {
                uint32_t pa[4];
                pa[0] = Pack2<T>::pack(s[2 * kt][0], s[2 * kt][1]);
                pa[1] = Pack2<T>::pack(s[2 * kt][2], s[2 * kt][3]);
                pa[2] = Pack2<T>::pack(s[2 * kt + 1][0], s[2 * kt + 1][1]);
                pa[3] = Pack2<T>::pack(s[2 * kt + 1][2], s[2 * kt + 1][3]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t bf[4];
                    int key = kt * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                    int chunk = dp * 2 + (lane >> 4);
                    ldsm_x4_t(bf, sv + tile_off<D>(key, chunk));
                    mma16816<T>(o[2 * dp], pa, bf[0], bf[1]);
                    mma16816<T>(o[2 * dp + 1], pa, bf[2], bf[3]);
                }
            }
        }
        __syncthreads(); /* the plan buffer is rewritten by the next round */
    }
    cp_async_wait<0>();

    /* epilogue: normalise and write the valid rows */
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lt = quad_sum(l[r]);
        int i = i0 + warp * 16 + g + r * 8;
        if (i >= q_len) continue;
        float inv = lt > 0.f ? 1.f / lt : 0.f;
        uint16_t *orow = a.out + b * a.o_sb + h * a.o_sh + (int64_t)(q_start + i) * a.o_st;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            uint32_t pk = Pack2<T>::pack(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
            *reinterpret_cast<uint32_t *>(orow + n * 8 + 2 * c4) = pk;
        }
        if (a.lse != nullptr && c4 == 0)
            a.lse[b * a.lse_sb + h * a.lse_sh + q_start + i] =
                lt > 0.f ? (m[r] + log2f(lt)) * kLn2 : -INFINITY;
    }
}

template <typename T, int D> sf_status launch(const PrefillArgs &a, int heads_q, int batch,
                                              int max_q_len, cudaStream_t stream)
{
    constexpr int bytes = smem_bytes<D>();
    static unsigned long long configured = 0;
    if (!configure_once((const void *)prefill_kernel<T, D>, bytes, &configured)) return SF_ERR_CUDA;
    dim3 grid(heads_q, (max_q_len + BM - 1) / BM, batch);
    prefill_kernel<T, D><<<grid, THREADS, bytes, stream>>>(a);
    return last_launch_status();
}

/* SEGFLEX_PREFILL_IMPL (read once per process): unset or "auto" picks per call (below);
 * "mma", "wgmma" and "small" force one kernel for A/B runs wherever it can run. */
enum { IMPL_AUTO = 0, IMPL_MMA = 1, IMPL_WGMMA = 2, IMPL_SMALL = 3 };
int impl_choice()
{
    static const int choice = [] {
        const char *e = getenv("SEGFLEX_PREFILL_IMPL");
        if (e != nullptr && strcmp(e, "mma") == 0) return (int)IMPL_MMA;
        if (e != nullptr && strcmp(e, "wgmma") == 0) return (int)IMPL_WGMMA;
        if (e != nullptr && strcmp(e, "small") == 0) return (int)IMPL_SMALL;
        return (int)IMPL_AUTO;
    }();
    return choice;
}

/* The persistent grid of the wgmma kernel: one block per SM, or SEGFLEX_PREFILL_GRID
 * (read once per process) blocks when that is smaller. */
int persistent_grid(int sms)
{
    static const int cap = [] {
        const char *e = getenv("SEGFLEX_PREFILL_GRID");
        const int n = e != nullptr ? atoi(e) : 0;
        return n > 0 ? n : INT32_MAX;
    }();
    return sms < cap ? sms : cap;
}

/*
 * Whether the short-problem kernel (prefill_small.cu) takes this call. In auto mode: when
 * the mma kernel's grid of 64-row blocks would not fill the GPU, i.e. fewer than two
 * blocks per SM (the mma kernel's occupancy). Then the time is not throughput but the chain
 * of the slowest block (the one holding the last rows, which has the most key tiles, all
 * run one after another in each of its warps), and the small kernel shortens that chain
 * four ways (16-row blocks, every tile's keys dealt to the 4 warps) at the price of 4x the
 * blocks and of loading each tile for 16 rows instead of 64. A grid that fills the GPU is
 * throughput-bound, and there the 4x K/V traffic and the per-block merge cost more than
 * they save. Examples (24 query heads, 132 SMs, limit 264): one sequence of 256 tokens:
 * 24 x 4 = 96 blocks -> small; one of 2,016: 24 x 32 = 768 -> mma/wgmma; 32 sequences of
 * ~270: 24 x 32 x 5 = 3,840 -> mma.
 */
constexpr int SMALL_MAX_MMA_BLOCKS_PER_SM = 2;

bool use_small(int heads_q, int batch, int max_q_len)
{
    const int choice = impl_choice();
    if (choice == IMPL_MMA || choice == IMPL_WGMMA) return false;
    if ((max_q_len + SMALL_BM - 1) / SMALL_BM > 65535) return false; /* grid y limit */
    if (choice == IMPL_SMALL) return true;
    bool sm90;
    const int sms = device_sms(&sm90);
    if (sms <= 0) return false;
    const long long mma_blocks = (long long)heads_q * batch * ((max_q_len + BM - 1) / BM);
    return mma_blocks < (long long)SMALL_MAX_MMA_BLOCKS_PER_SM * sms;
}

/*
 * Whether the wgmma kernel takes this call: head dim 128 on a compute capability 9.0
 * device, unless another kernel is forced. In auto mode it also needs at least one of its
 * 128-row blocks per SM (below that the 64-row blocks of the mma kernel spread the
 * work over twice as many SMs and a short problem is latency-bound anyway) and
 * sequences of at least SM90_MIN_ROWS queries: with short sequences the 128x128 tiles
 * compute more masked-out pairs and each block runs few tiles. Measured on an H100,
 * 24/8 heads: 32 sequences of about 270 tokens took 224 us with wgmma and 172 us with
 * mma; one of 2,016 tokens 62 us with wgmma and 74 us with mma. (Since the wgmma grid is
 * persistent the 32 sequences take 171 us with it, the same as with mma, so the rule
 * stands.)
 */
constexpr int SM90_MIN_ROWS = 512;

bool use_sm90(int head_dim, int heads_q, int batch, int max_q_len)
{
    const int choice = impl_choice();
    if (choice == IMPL_MMA || choice == IMPL_SMALL || head_dim != 128) return false;
    bool sm90;
    const int sms = device_sms(&sm90);
    if (!sm90) return false;
    if (choice == IMPL_WGMMA) return true;
    if (max_q_len < SM90_MIN_ROWS) return false;
    const long long blocks =
        (long long)heads_q * batch * ((max_q_len + SM90_BM - 1) / SM90_BM);
    return blocks >= sms;
}

} // namespace
} // namespace sfcuda

using namespace sfcuda;

extern "C" int sf_cuda_available(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the error so later calls are not poisoned */
        return 0;
    }
    return n > 0;
}

extern "C" sf_status sf_cuda_attention(const sf_layouts *layouts, const sf_seqs *seqs,
                                       const sf_attn_params *params, sf_tensor q, sf_tensor k,
                                       sf_tensor v, sf_tensor out, float *lse,
                                       int64_t lse_stride_b, int64_t lse_stride_h,
                                       void *workspace, size_t workspace_bytes, void *stream)
{
    (void)workspace;
    (void)workspace_bytes;
    bool nothing;
    const sf_status checked = check_call(layouts, seqs, params, q, k, v, out, &nothing);
    if (checked != SF_OK || nothing) return checked;
    if ((int64_t)(seqs->max_q_len + BM - 1) / BM > 65535) return SF_ERR_ARGUMENT; /* grid y */
    PrefillArgs a;
    pack_args(a, layouts, seqs, params, q, k, v, out, lse, lse_stride_b, lse_stride_h);

    cudaStream_t st = (cudaStream_t)stream;
    const bool bf = params->dtype == SF_BFLOAT16;
    bool sm90;
    if (use_small(params->heads_q, seqs->batch, seqs->max_q_len))
        return launch_prefill_small(a, bf, params->head_dim, params->heads_q, seqs->batch,
                                    seqs->max_q_len, st);
    if (use_sm90(params->head_dim, params->heads_q, seqs->batch, seqs->max_q_len))
        return launch_prefill_sm90(a, bf, params->heads_q, seqs->batch, seqs->max_q_len,
                                   persistent_grid(device_sms(&sm90)), st);
    if (params->head_dim == 64)
        return bf ? launch<__nv_bfloat16, 64>(a, params->heads_q, seqs->batch, seqs->max_q_len, st)
                  : launch<__half, 64>(a, params->heads_q, seqs->batch, seqs->max_q_len, st);
    return bf ? launch<__nv_bfloat16, 128>(a, params->heads_q, seqs->batch, seqs->max_q_len, st)
              : launch<__half, 128>(a, params->heads_q, seqs->batch, seqs->max_q_len, st);
}

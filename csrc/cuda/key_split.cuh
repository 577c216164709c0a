/*
 * key_split.cuh - attention of at most 16 query rows per warp, with the keys of each tile
 * dealt to the warps of a block in chunks of 16, and the merge of the warps' softmax states
 * at the end. The kernels that use it have few query rows per block and need many warps on
 * the chain of one block's tiles: the decode kernels (a few new tokens per KV head) and the
 * short-sequence prefill kernel.
 *
 * A warp's state for its 16 rows, in mma.sync m16n8k16 accumulator layout: lane (g, c4)
 * with g = lane / 4, c4 = lane % 4 holds rows g and g + 8 (index r = 0, 1), m[r] the
 * running maximum (base 2), l[r] the running sum of this lane's columns (summed over the
 * quad at the end), o[n][2r], o[n][2r+1] output columns n*8 + 2*c4, +1. A warp of at most 8
 * rows can run the narrow products instead (attend_chunk_narrow) and turn its state into
 * this one at the end (narrow_to_rows).
 */
#ifndef SEGFLEX_CUDA_KEY_SPLIT_CUH
#define SEGFLEX_CUDA_KEY_SPLIT_CUH

#include "common.cuh"

namespace sfcuda {

/* Where 16-byte chunk `ch` of row `row` of a K/V tile lies in shared memory, for tiles
 * written by cp.async (common.cuh's swizzled layout); decode_tma.cuh has the copy engine's. */
template <int D> struct CpAsyncTile {
    static __device__ __forceinline__ uint32_t off(int row, int ch) { return tile_off<D>(row, ch); }
};

/* The warp's Q fragments of rows g and g + 8 straight from global memory (qrow[r]: the D
 * elements of row g + 8r), in the mma.sync A layout: qf[kk][r] holds columns kk*16 + 2*c4, +1
 * of row r, qf[kk][2 + r] columns kk*16 + 8 + 2*c4, +1. A row that is not valid is never read
 * and holds zeros. */
template <int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[D / 16][4],
                                                 const uint16_t *const (&qrow)[2],
                                                 const bool (&valid)[2])
{
    const int c4 = threadIdx.x & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t lo = 0, hi = 0;
            if (valid[r]) {
                lo = *reinterpret_cast<const uint32_t *>(qrow[r] + kk * 16 + 2 * c4);
                hi = *reinterpret_cast<const uint32_t *>(qrow[r] + kk * 16 + 8 + 2 * c4);
            }
            qf[kk][r] = lo;
            qf[kk][2 + r] = hi;
        }
    }
}

/*
 * One 16-key chunk (keys cchunk*16 .. +15 of the tile) for the warp's 16 query rows:
 * S = Q K^T on mma.sync, the mask, the online softmax update of m and l, and O += P V.
 * Keys and values sit in shared memory at sk and sv, placed as Tile::off says.
 * mask(r, col, s) turns the raw score s of row r and tile column col into the base-2 logit
 * (scale, bias) or -INFINITY where the pair is not allowed.
 * The D/16 products of a score block accumulate into QK_CHAINS / 2 separate sums (even and
 * odd k steps when 4): a decode warp, alone on its block's chain, then waits for half as many
 * dependent mma latencies (measured on an H100: -0.1 to -0.3 us per decode call at batch 1).
 * The short-problem prefill keeps 2, where the extra registers cost more than that (+0.15 us
 * at 5x48+16).
 */
template <typename T, int D, typename Tile, int QK_CHAINS, typename Mask>
__device__ __forceinline__ void attend_chunk(uint32_t sk, uint32_t sv, int cchunk, const Mask &mask,
                                             const uint32_t (&qf)[D / 16][4], float (&m)[2],
                                             float (&l)[2], float (&o)[D / 8][4])
{
    const int lane = threadIdx.x & 31, c4 = lane & 3;
    static_assert(QK_CHAINS == 2 || QK_CHAINS == 4, "2 or 4 score chains");
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float s_odd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}}; /* QK_CHAINS == 4 */
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t bf[4];
        int key = cchunk * 16 + (lane & 7) + ((lane >> 4) << 3);
        int ch = kk * 2 + ((lane >> 3) & 1);
        ldsm_x4(bf, sk + Tile::off(key, ch));
        float(&acc)[2][4] = (QK_CHAINS == 4 && (kk & 1)) ? s_odd : s;
        mma16816<T>(acc[0], qf[kk], bf[0], bf[1]);
        mma16816<T>(acc[1], qf[kk], bf[2], bf[3]);
    }
    if constexpr (QK_CHAINS == 4) {
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int x = 0; x < 4; ++x) s[n][x] += s_odd[n][x];
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                const int col = cchunk * 16 + n * 8 + 2 * c4 + x;
                const float val = mask(r, col, s[n][2 * r + x]);
                s[n][2 * r + x] = val;
                mx = fmaxf(mx, val);
            }
        }
        online_softmax_row(s, r, quad_max(mx), m[r], l[r], alpha[r]);
    }
    uint32_t pa[4];
    pa[0] = Pack2<T>::pack(s[0][0], s[0][1]);
    pa[1] = Pack2<T>::pack(s[0][2], s[0][3]);
    pa[2] = Pack2<T>::pack(s[1][0], s[1][1]);
    pa[3] = Pack2<T>::pack(s[1][2], s[1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
        o[2 * dp][0] *= alpha[0];
        o[2 * dp][1] *= alpha[0];
        o[2 * dp][2] *= alpha[1];
        o[2 * dp][3] *= alpha[1];
        o[2 * dp + 1][0] *= alpha[0];
        o[2 * dp + 1][1] *= alpha[0];
        o[2 * dp + 1][2] *= alpha[1];
        o[2 * dp + 1][3] *= alpha[1];
        uint32_t bf[4];
        int key = cchunk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        int ch = dp * 2 + (lane >> 4);
        ldsm_x4_t(bf, sv + Tile::off(key, ch));
        mma16816<T>(o[2 * dp], pa, bf[0], bf[1]);
        mma16816<T>(o[2 * dp + 1], pa, bf[2], bf[3]);
    }
}

/*
 * The same chunk for a warp with at most 8 query rows, as in decode when a KV head serves
 * few query heads and new tokens (3 heads x 1 token at 24 / 8 heads). The keys take the M
 * side of both products and the rows the N side: S^T = K Q^T and O^T += V^T P^T need one
 * m16n8k16 per k step where attend_chunk needs two, and O^T half the registers.
 *
 * Narrow state: lane (g, c4) holds rows 2*c4 and 2*c4 + 1 (index r = 0, 1): m[r], l[r] as
 * above (l summed over the 8 lanes of a c4 at the end, narrow_to_rows), ot[i][r] and
 * ot[i][2 + r] output columns 16i + g and 16i + g + 8. mask(r, col, s) sees those rows.
 * Q comes as the usual A fragments of rows g (qf[kk][0], qf[kk][2]): the B fragments of
 * Q^T. The B operand of the second product, P^T, is the S^T fragment with each 8x8 block
 * turned over (movmatrix).
 */
template <typename T, int D, typename Tile, typename Mask>
__device__ __forceinline__ void attend_chunk_narrow(uint32_t sk, uint32_t sv, int cchunk,
                                                    const Mask &mask,
                                                    const uint32_t (&qf)[D / 16][4], float (&m)[2],
                                                    float (&l)[2], float (&ot)[D / 16][4])
{
    const int lane = threadIdx.x & 31, g = lane >> 2;
    /* S^T, keys g and g + 8 of the chunk; even and odd k steps in separate chains */
    float s[4] = {0.f, 0.f, 0.f, 0.f}, s_odd[4] = {0.f, 0.f, 0.f, 0.f};
    const int k_row = cchunk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ka[4];
        ldsm_x4(ka, sk + Tile::off(k_row, kk * 2 + (lane >> 4)));
        mma16816<T>((kk & 1) ? s_odd : s, ka, qf[kk][0], qf[kk][2]);
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float lo = mask(r, cchunk * 16 + g, s[r] + s_odd[r]);
        const float hi = mask(r, cchunk * 16 + g + 8, s[2 + r] + s_odd[2 + r]);
        float mx = fmaxf(lo, hi);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float m_new = fmaxf(m[r], mx);
        const float base = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = fast_exp2(m[r] - base);
        s[r] = fast_exp2(lo - base);
        s[2 + r] = fast_exp2(hi - base);
        l[r] = l[r] * alpha[r] + s[r] + s[2 + r];
        m[r] = m_new;
    }
    const uint32_t pb0 = movmatrix_t(Pack2<T>::pack(s[0], s[1])); /* keys 0-7 */
    const uint32_t pb1 = movmatrix_t(Pack2<T>::pack(s[2], s[3])); /* keys 8-15 */
    const int v_row = cchunk * 16 + (lane & 7) + ((lane >> 4) << 3);
#pragma unroll
    for (int i = 0; i < D / 16; ++i) {
        ot[i][0] *= alpha[0];
        ot[i][1] *= alpha[1];
        ot[i][2] *= alpha[0];
        ot[i][3] *= alpha[1];
        uint32_t va[4];
        ldsm_x4_t(va, sv + Tile::off(v_row, i * 2 + ((lane >> 3) & 1)));
        mma16816<T>(ot[i], va, pb0, pb1);
    }
}

/* Shared memory narrow_to_rows needs per warp: 8 rows of D floats (padded by 4 so that the
 * lanes' stores fall in distinct banks), then 8 pairs (m, l). */
template <int D> __host__ __device__ constexpr int narrow_bytes()
{
    return 8 * (D + 4) * 4 + 8 * 2 * 4;
}

/* Turns a warp's narrow state (attend_chunk_narrow) into the usual one (this file's top),
 * through the warp's own buf (narrow_bytes), so that merge_warps and the writes serve both:
 * rows g take the 8 rows, rows g + 8 are empty. Every lane of the warp calls it. */
template <int D>
__device__ __forceinline__ void narrow_to_rows(float *buf, int lane, float (&m)[2], float (&l)[2],
                                               float (&o)[D / 8][4])
{
    constexpr int STRIDE = D + 4;
    const int g = lane >> 2, c4 = lane & 3;
    float *s_ml = buf + 8 * STRIDE;
    float(&ot)[D / 16][4] = *reinterpret_cast<float(*)[D / 16][4]>(&o[0][0]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        sum += __shfl_xor_sync(0xffffffffu, sum, 8);
        sum += __shfl_xor_sync(0xffffffffu, sum, 16);
        if (g == 0) {
            s_ml[(2 * c4 + r) * 2] = m[r];
            s_ml[(2 * c4 + r) * 2 + 1] = sum;
        }
#pragma unroll
        for (int i = 0; i < D / 16; ++i) {
            buf[(2 * c4 + r) * STRIDE + 16 * i + g] = ot[i][r];
            buf[(2 * c4 + r) * STRIDE + 16 * i + g + 8] = ot[i][2 + r];
        }
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const float2 x = *reinterpret_cast<const float2 *>(buf + g * STRIDE + 8 * n + 2 * c4);
        o[n][0] = x.x;
        o[n][1] = x.y;
        o[n][2] = 0.f;
        o[n][3] = 0.f;
    }
    m[0] = s_ml[2 * g];
    l[0] = c4 == 0 ? s_ml[2 * g + 1] : 0.f; /* merge_warps sums l over the quad */
    m[1] = -INFINITY;
    l[1] = 0.f;
}

/* Shared memory merge_warps needs: [4 warps][D/8][32 lanes][4] floats of o, then
 * [4 warps][32 lanes][4] of (m0, m1, l0, l1). */
template <int D> __host__ __device__ constexpr int merge_warps_bytes()
{
    return 4 * (16 * D * 4 + 32 * 4 * 4);
}

/*
 * After the key loop of a block of 4 warps: warp w serves row group rg = w % rg_count with
 * key share kg = w / rg_count. The warps that share rows merge their softmax states into
 * the warp with kg == 0 through shared memory s_o (merge_warps_bytes). Every thread of the
 * block calls this (it holds a barrier when kg_count > 1). On return l is summed over the
 * quad, and the kg == 0 warps hold their rows' merged state.
 */
template <int D>
__device__ __forceinline__ void merge_warps(float *s_o, int warp, int lane, int kg, int kg_count,
                                            int rg_count, float (&m)[2], float (&l)[2],
                                            float (&o)[D / 8][4])
{
    float *s_ml = s_o + 4 * 16 * D; /* [4 warps][32 lanes][4] */
    l[0] = quad_sum(l[0]);
    l[1] = quad_sum(l[1]);
    if (kg_count == 1) return;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float4 *>(s_o + ((warp * (D / 8) + n) * 32 + lane) * 4) =
            make_float4(o[n][0], o[n][1], o[n][2], o[n][3]);
    *reinterpret_cast<float4 *>(s_ml + (warp * 32 + lane) * 4) = make_float4(m[0], m[1], l[0], l[1]);
    __syncthreads();
    if (kg != 0) return;
    float mm[2] = {m[0], m[1]};
    for (int w = warp + rg_count; w < 4; w += rg_count) {
        float4 ml = *reinterpret_cast<const float4 *>(s_ml + (w * 32 + lane) * 4);
        mm[0] = fmaxf(mm[0], ml.x);
        mm[1] = fmaxf(mm[1], ml.y);
    }
    float f0 = mm[0] == -INFINITY ? 0.f : fast_exp2(m[0] - mm[0]);
    float f1 = mm[1] == -INFINITY ? 0.f : fast_exp2(m[1] - mm[1]);
    l[0] *= f0;
    l[1] *= f1;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= f0; o[n][1] *= f0; o[n][2] *= f1; o[n][3] *= f1;
    }
    for (int w = warp + rg_count; w < 4; w += rg_count) {
        float4 ml = *reinterpret_cast<const float4 *>(s_ml + (w * 32 + lane) * 4);
        float e0 = mm[0] == -INFINITY ? 0.f : fast_exp2(ml.x - mm[0]);
        float e1 = mm[1] == -INFINITY ? 0.f : fast_exp2(ml.y - mm[1]);
        l[0] += ml.z * e0;
        l[1] += ml.w * e1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            float4 x = *reinterpret_cast<const float4 *>(s_o + ((w * (D / 8) + n) * 32 + lane) * 4);
            o[n][0] += x.x * e0; o[n][1] += x.y * e0; o[n][2] += x.z * e1; o[n][3] += x.w * e1;
        }
    }
    m[0] = mm[0];
    m[1] = mm[1];
}

/*
 * merge_warps for a block whose 4 warps all hold the same 16 rows, with the merge spread
 * over the warps: after the one barrier, warp w merges output columns [w*D/4, (w+1)*D/4)
 * of the four states, so each warp reads a quarter of the exchange and writes a quarter of
 * each row, where merge_warps leaves all of it to one warp. (On the short-problem prefill
 * kernel the merge ends the critical path of the block holding the global tail.)
 * Every thread of the block calls it. On return mo[i] holds n-block w*D/32 + i of the
 * merged, unnormalised rows, and m, l the merged row state (l summed over the quad).
 */
template <int D>
__device__ __forceinline__ void merge_warps_by_columns(float *s_o, int warp, int lane, float (&m)[2],
                                                       float (&l)[2], const float (&o)[D / 8][4],
                                                       float (&mo)[D / 32][4])
{
    float *s_ml = s_o + 4 * 16 * D; /* the layout of merge_warps */
    l[0] = quad_sum(l[0]);
    l[1] = quad_sum(l[1]);
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float4 *>(s_o + ((warp * (D / 8) + n) * 32 + lane) * 4) =
            make_float4(o[n][0], o[n][1], o[n][2], o[n][3]);
    *reinterpret_cast<float4 *>(s_ml + (warp * 32 + lane) * 4) = make_float4(m[0], m[1], l[0], l[1]);
    __syncthreads();
    float4 ml[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) ml[w] = *reinterpret_cast<const float4 *>(s_ml + (w * 32 + lane) * 4);
    const float mm0 = fmaxf(fmaxf(ml[0].x, ml[1].x), fmaxf(ml[2].x, ml[3].x));
    const float mm1 = fmaxf(fmaxf(ml[0].y, ml[1].y), fmaxf(ml[2].y, ml[3].y));
    float e0[4], e1[4];
    l[0] = l[1] = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        e0[w] = mm0 == -INFINITY ? 0.f : fast_exp2(ml[w].x - mm0);
        e1[w] = mm1 == -INFINITY ? 0.f : fast_exp2(ml[w].y - mm1);
        l[0] += ml[w].z * e0[w];
        l[1] += ml[w].w * e1[w];
    }
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
        const int n = warp * (D / 32) + i;
        mo[i][0] = mo[i][1] = mo[i][2] = mo[i][3] = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float4 v = *reinterpret_cast<const float4 *>(s_o + ((w * (D / 8) + n) * 32 + lane) * 4);
            mo[i][0] += v.x * e0[w];
            mo[i][1] += v.y * e0[w];
            mo[i][2] += v.z * e1[w];
            mo[i][3] += v.w * e1[w];
        }
    }
    m[0] = mm0;
    m[1] = mm1;
}

} // namespace sfcuda

#endif

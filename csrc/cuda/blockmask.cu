/*
 * blockmask.cu - FlexAttention's block format built on the GPU
 * (sf_cuda_block_mask_build), the same output as the C builder.
 *
 * One block of threads per (sequence, query block). Each thread classifies
 * kv blocks straight from the segment table (exact, O(segments touched)),
 * then the block writes both index rows in one ordered pass: a block j goes
 * to position "partial blocks before j" when partial and to
 * "all partial blocks + non-partial blocks before j" otherwise (and the same
 * for the full list), which is the C builder's "active ascending, then the
 * others ascending". The running counts come from warp ballots.
 */
#include "common.cuh"

namespace sfcuda {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

struct MaskArgs {
    const int32_t *seg_ptr, *seg_end;
    const uint8_t *seg_kind;
    int32_t q_len, kv_len, q_block, kv_block, nq, nk;
    int32_t *num, *idx, *full_num, *full_idx;
};

/* Classification of block (qi, kj) of sequence v, as the C builder defines it. */
__device__ int classify_block(const SegView &v, const MaskArgs &a, int qi, int kj)
{
    const int q_offset = a.kv_len - a.q_len;
    int q0 = qi * a.q_block, q1 = q0 + a.q_block, k0 = kj * a.kv_block, k1 = k0 + a.kv_block;
    bool complete = q1 <= a.q_len && k1 <= a.kv_len;
    int p0 = q0 + q_offset, p1 = min(q1, a.q_len) + q_offset;
    if (p0 < 0) p0 = 0;
    if (p1 > v.length) { p1 = v.length; complete = false; }
    if (k1 > a.kv_len) k1 = a.kv_len;
    if (k1 > v.length) { k1 = v.length; complete = false; }
    if (p1 <= p0 || k1 <= k0) return SF_BLOCK_EMPTY;
    bool nb;
    int cls = classify_rect(v, p0, p1 - 1, k0, k1 - 1, &nb);
    if (cls == SF_BLOCK_FULL && !complete) cls = SF_BLOCK_PARTIAL;
    return cls;
}

__global__ void __launch_bounds__(THREADS) block_mask_kernel(const MaskArgs a)
{
    __shared__ int s_cnt[2][WARPS];
    const int qi = blockIdx.x, b = blockIdx.y;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const SegView v = make_view(a.seg_ptr, a.seg_end, a.seg_kind, nullptr, b);
    const size_t row = (size_t)b * a.nq + qi;
    int32_t *idx = a.idx + row * a.nk, *fidx = a.full_idx + row * a.nk;

    /* Totals first: a non-active block's place depends on how many are active. */
    int n_part = 0, n_full = 0;
    for (int j = tid; j < a.nk; j += THREADS) {
        int c = classify_block(v, a, qi, j);
        n_part += c == SF_BLOCK_PARTIAL;
        n_full += c == SF_BLOCK_FULL;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        n_part += __shfl_xor_sync(0xffffffffu, n_part, o);
        n_full += __shfl_xor_sync(0xffffffffu, n_full, o);
    }
    if (lane == 0) { s_cnt[0][warp] = n_part; s_cnt[1][warp] = n_full; }
    __syncthreads();
    int tot_part = 0, tot_full = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) { tot_part += s_cnt[0][w]; tot_full += s_cnt[1][w]; }
    if (tid == 0) { a.num[row] = tot_part; a.full_num[row] = tot_full; }
    __syncthreads();

    /* Ordered pass: ranks from ballots, carried across chunks of THREADS. */
    int run_part = 0, run_full = 0;
    for (int j0 = 0; j0 < a.nk; j0 += THREADS) {
        int j = j0 + tid;
        int c = j < a.nk ? classify_block(v, a, qi, j) : SF_BLOCK_EMPTY;
        unsigned bp = __ballot_sync(0xffffffffu, c == SF_BLOCK_PARTIAL);
        unsigned bf = __ballot_sync(0xffffffffu, c == SF_BLOCK_FULL);
        if (lane == 0) { s_cnt[0][warp] = __popc(bp); s_cnt[1][warp] = __popc(bf); }
        __syncthreads();
        int before_p = run_part, before_f = run_full, chunk_p = 0, chunk_f = 0;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            if (w < warp) { before_p += s_cnt[0][w]; before_f += s_cnt[1][w]; }
            chunk_p += s_cnt[0][w];
            chunk_f += s_cnt[1][w];
        }
        unsigned lt = (1u << lane) - 1u;
        before_p += __popc(bp & lt);
        before_f += __popc(bf & lt);
        if (j < a.nk) {
            idx[c == SF_BLOCK_PARTIAL ? before_p : tot_part + (j - before_p)] = j;
            fidx[c == SF_BLOCK_FULL ? before_f : tot_full + (j - before_f)] = j;
        }
        run_part += chunk_p;
        run_full += chunk_f;
        __syncthreads();
    }
}

} // namespace
} // namespace sfcuda

using namespace sfcuda;

extern "C" sf_status sf_cuda_block_mask_build(const sf_layouts *layouts, int32_t q_len,
                                              int32_t kv_len, int32_t q_block, int32_t kv_block,
                                              int32_t *kv_num_blocks, int32_t *kv_indices,
                                              int32_t *full_kv_num_blocks,
                                              int32_t *full_kv_indices, void *stream)
{
    if (!layouts || q_len < 1 || kv_len < 1 || q_len > kv_len || q_block < 1 || kv_block < 1)
        return SF_ERR_ARGUMENT;
    if (!kv_num_blocks || !kv_indices || !full_kv_num_blocks || !full_kv_indices)
        return SF_ERR_ARGUMENT;
    if (layouts->batch < 0 || layouts->batch > 65535) return SF_ERR_ARGUMENT;
    if (layouts->batch == 0) return SF_OK;
    if (!layouts->seg_ptr || !layouts->seg_end || !layouts->seg_kind) return SF_ERR_LAYOUT;
    MaskArgs a;
    a.seg_ptr = layouts->seg_ptr;
    a.seg_end = layouts->seg_end;
    a.seg_kind = layouts->seg_kind;
    a.q_len = q_len;
    a.kv_len = kv_len;
    a.q_block = q_block;
    a.kv_block = kv_block;
    a.nq = (q_len + q_block - 1) / q_block;
    a.nk = (kv_len + kv_block - 1) / kv_block;
    a.num = kv_num_blocks;
    a.idx = kv_indices;
    a.full_num = full_kv_num_blocks;
    a.full_idx = full_kv_indices;
    dim3 grid(a.nq, layouts->batch);
    block_mask_kernel<<<grid, THREADS, 0, (cudaStream_t)stream>>>(a);
    return last_launch_status();
}

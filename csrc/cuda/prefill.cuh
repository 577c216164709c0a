/*
 * prefill.cuh - what the two prefill kernels (prefill.cu: mma.sync, any sm_80+;
 * prefill_sm90.cu: wgmma, sm_90a) share: their argument block and the entry of the
 * Hopper kernel, which prefill.cu's sf_cuda_attention dispatches to.
 */
#ifndef SEGFLEX_CUDA_PREFILL_CUH
#define SEGFLEX_CUDA_PREFILL_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "segflex.h"

namespace sfcuda {

struct PrefillArgs {
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

/* Query rows per block of the Hopper kernel (it sizes the grid's y extent). */
constexpr int SM90_BM = 128;

/* The Hopper (sm_90a) kernel, head dim 128 only; bf16 when `bf16`, else fp16. */
sf_status launch_prefill_sm90(const PrefillArgs &a, bool bf16, int heads_q, int batch,
                              int max_q_len, cudaStream_t stream);

} // namespace sfcuda

#endif

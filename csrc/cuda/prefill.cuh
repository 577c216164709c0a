/*
 * prefill.cuh - what the three prefill kernels share: their argument block and the
 * entries of the two that prefill.cu's sf_cuda_attention dispatches to.
 *
 *   prefill.cu        mma.sync, any sm_80+: 64 query rows per block of 4 warps, each warp
 *                     16 rows and every key of the block's tiles. The general kernel.
 *   prefill_sm90.cu   wgmma, sm_90a, head dim 128: a persistent grid taking items of
 *                     128 rows, a producer warpgroup and two consumer warpgroups per
 *                     block. Long sequences.
 *   prefill_small.cu  mma.sync: 16 query rows per block of 4 warps, every 64-key tile
 *                     dealt to the warps in 16-key chunks, the warps' softmax states
 *                     merged at the end. Problems too small to fill the GPU.
 *
 * All three plan their key tiles the same way (plan.cuh) and have the same semantics.
 * sf_cuda_attention (prefill.cu) takes the small kernel when the mma kernel's grid would
 * not fill the GPU, the wgmma kernel for long sequences on sm_90, the mma kernel
 * otherwise; SEGFLEX_PREFILL_IMPL=mma|wgmma|small|auto overrides the choice.
 */
#ifndef SEGFLEX_CUDA_PREFILL_CUH
#define SEGFLEX_CUDA_PREFILL_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "segflex.h"
#include "common.cuh"

namespace sfcuda {

/* The prefill kernels read nothing beyond the common argument block. */
typedef AttnArgs PrefillArgs;

/* Query rows per work item of the Hopper kernel. */
constexpr int SM90_BM = 128;

/* The Hopper (sm_90a) kernel, head dim 128 only; bf16 when `bf16`, else fp16. Its grid is
 * persistent: one block per SM (sms), each taking work until none is left. */
sf_status launch_prefill_sm90(const PrefillArgs &a, bool bf16, int heads_q, int batch,
                              int max_q_len, int sms, cudaStream_t stream);

/* Query rows per block of the short-problem kernel (it sizes the grid's y extent). */
constexpr int SMALL_BM = 16;

/* The short-problem kernel, head dim 64 or 128; bf16 when `bf16`, else fp16. */
sf_status launch_prefill_small(const PrefillArgs &a, bool bf16, int head_dim, int heads_q,
                               int batch, int max_q_len, cudaStream_t stream);

} // namespace sfcuda

#endif

/*
 * no_cuda.c - the CUDA entry points of a build without CUDA: they exist so
 * that module.c links the same way in both builds, and they say "no CUDA".
 */
#include "segflex.h"

#ifndef SEGFLEX_WITH_CUDA
int sf_cuda_available(void) { return 0; }

sf_status sf_cuda_attention(const sf_layouts *layouts, const sf_seqs *seqs,
                            const sf_attn_params *params, sf_tensor q, sf_tensor k, sf_tensor v,
                            sf_tensor out, float *lse, int64_t lse_stride_b,
                            int64_t lse_stride_h, void *workspace, size_t workspace_bytes,
                            void *stream)
{
    return SF_ERR_CUDA;
}

sf_status sf_cuda_decode(const sf_layouts *layouts, const sf_seqs *seqs,
                         const sf_attn_params *params, sf_tensor q, sf_tensor k, sf_tensor v,
                         sf_tensor out, float *lse, int64_t lse_stride_b, int64_t lse_stride_h,
                         void *workspace, size_t workspace_bytes, void *stream)
{
    return SF_ERR_CUDA;
}

size_t sf_cuda_workspace_bytes(int32_t batch, int32_t max_q_len, int32_t max_kv_len,
                               const sf_attn_params *params)
{
    return 0;
}

sf_status sf_cuda_block_mask_build(const sf_layouts *layouts, int32_t q_len, int32_t kv_len,
                                   int32_t q_block, int32_t kv_block, int32_t *kv_num_blocks,
                                   int32_t *kv_indices, int32_t *full_kv_num_blocks,
                                   int32_t *full_kv_indices, void *stream)
{
    return SF_ERR_CUDA;
}
#endif

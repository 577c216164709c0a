/*
 * blockmask.c - FlexAttention's block-sparse format, built from segment
 * tables instead of from a dense [q_len, kv_len] boolean mask.
 *
 * torch's create_block_mask evaluates mask_mod at every (q, k) pair, pads the
 * dense mask with False up to whole blocks and sums each block. Here each
 * block is classified from the segments it touches (sf_classify_block), so
 * the cost is O(blocks x segments per block) instead of O(q_len x kv_len).
 *
 * Conventions shared with create_block_mask:
 *  - query i of the q axis sits at position i + (kv_len - q_len);
 *  - pairs past a sequence's layout length are False, and so are the padding
 *    pairs of the last, incomplete blocks: such blocks are never full;
 *  - the index lists hold the active blocks ascending, then the others
 *    ascending (a stable descending argsort of the 0/1 block matrix).
 */
#include <stdlib.h>

#include "segflex.h"

/* Classify block (qi, kj): the rectangle clipped to the sequence's length. */
static int classify(const sf_layouts *lay, int32_t b, int32_t length, int32_t q_offset,
                    int32_t qi, int32_t kj, int32_t q_len, int32_t kv_len, int32_t qb, int32_t kb)
{
    int32_t q0 = qi * qb, q1 = q0 + qb, k0 = kj * kb, k1 = k0 + kb;
    int complete = q1 <= q_len && k1 <= kv_len;
    /* Positions of the queries, then clip both ranges to the layout. */
    int32_t p0 = q0 + q_offset, p1 = (q1 < q_len ? q1 : q_len) + q_offset;
    if (p0 < 0) p0 = 0;
    if (p1 > length) { p1 = length; complete = 0; }
    if (k1 > kv_len) k1 = kv_len;
    if (k1 > length) { k1 = length; complete = 0; }
    if (p1 <= p0 || k1 <= k0) return SF_BLOCK_EMPTY;
    int kind = sf_classify_block(lay, b, p0, p1, k0, k1);
    if (kind == SF_BLOCK_FULL && !complete) kind = SF_BLOCK_PARTIAL;
    return kind;
}

/* Writes one row of an index list: `flags[j] == want` first, then the rest. */
static int32_t write_row(const uint8_t *flags, uint8_t want, int32_t nk, int32_t *indices)
{
    int32_t n = 0;
    for (int32_t j = 0; j < nk; j++)
        if (flags[j] == want) indices[n++] = j;
    int32_t active = n;
    for (int32_t j = 0; j < nk; j++)
        if (flags[j] != want) indices[n++] = j;
    return active;
}

sf_status sf_block_mask_build(const sf_layouts *lay, int32_t q_len, int32_t kv_len,
                              int32_t q_block, int32_t kv_block, int32_t *kv_num_blocks,
                              int32_t *kv_indices, int32_t *full_kv_num_blocks,
                              int32_t *full_kv_indices)
{
    if (!lay || q_len < 1 || kv_len < 1 || q_len > kv_len || q_block < 1 || kv_block < 1)
        return SF_ERR_ARGUMENT;
    if (!kv_num_blocks || !kv_indices || !full_kv_num_blocks || !full_kv_indices)
        return SF_ERR_ARGUMENT;
    sf_status st = sf_layouts_validate(lay);
    if (st != SF_OK) return st;

    const int32_t nq = (q_len + q_block - 1) / q_block, nk = (kv_len + kv_block - 1) / kv_block;
    const int32_t q_offset = kv_len - q_len;
    sf_status result = SF_OK;

    /* Threads pay only for large masks: starting a team costs more than classifying a
     * few thousand blocks, especially when the cores are busy. */
    const int parallel = (int64_t)lay->batch * nq * nk > 65536;
#pragma omp parallel if (parallel)
    {
        uint8_t *flags = (uint8_t *)malloc((size_t)nk);
        if (!flags) {
#pragma omp atomic write
            result = SF_ERR_NO_MEMORY;
        }
#pragma omp for collapse(2) schedule(dynamic, 8)
        for (int32_t b = 0; b < lay->batch; b++) {
            for (int32_t qi = 0; qi < nq; qi++) {
                if (!flags) continue;
                int32_t length = sf_layout_length(lay, b);
                for (int32_t kj = 0; kj < nk; kj++)
                    flags[kj] = (uint8_t)classify(lay, b, length, q_offset, qi, kj, q_len,
                                                  kv_len, q_block, kv_block);
                size_t row = (size_t)b * nq + qi;
                kv_num_blocks[row] = write_row(flags, SF_BLOCK_PARTIAL, nk, kv_indices + row * nk);
                full_kv_num_blocks[row] =
                    write_row(flags, SF_BLOCK_FULL, nk, full_kv_indices + row * nk);
            }
        }
        free(flags);
    }
    return result;
}

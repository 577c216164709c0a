/*
 * segflex.h - the C contract of segflex.
 *
 * Attention over sequences cut into segments. Every sequence of a batch is a
 * run of consecutive segments; each segment has a kind and a score bias:
 *
 *   shared    a query in it sees earlier shared segments and its own segment
 *   isolated  a query in it sees earlier shared segments and its own segment
 *             (and nothing of other isolated segments)
 *   global    a query in it sees every earlier token
 *
 *   mask(q, k) = k <= q && (kind(seg(q)) == GLOBAL || seg(k) == seg(q)
 *                           || kind(seg(k)) == SHARED)
 *   score(q, k) = scale * <q, k> + (kind(seg(q)) == GLOBAL ? bias(seg(k)) : 0)
 *
 * Positions are counted from 0 inside each sequence. A sequence may be longer
 * than its layout (a KV cache that grew during generation): positions at or
 * past the layout's length belong to an implicit trailing GLOBAL segment with
 * bias 0.
 *
 * Nothing here knows about Python or torch. Pointers are plain pointers,
 * strides are in elements, and the last (head) dimension of every tensor is
 * contiguous. CUDA entry points take device pointers and a cudaStream_t passed
 * as void*; they never synchronise the host and never allocate.
 */
#ifndef SEGFLEX_H
#define SEGFLEX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ errors */

typedef enum {
    SF_OK = 0,
    SF_ERR_ARGUMENT = 1,     /* a size, stride or pointer is invalid      */
    SF_ERR_LAYOUT = 2,       /* a segment table is malformed              */
    SF_ERR_DTYPE = 3,        /* unsupported element type                  */
    SF_ERR_HEAD_DIM = 4,     /* unsupported head dimension                */
    SF_ERR_NO_MEMORY = 5,    /* a host allocation failed                  */
    SF_ERR_CUDA = 6,         /* a CUDA call or launch failed              */
    SF_ERR_WORKSPACE = 7,    /* the workspace given is too small          */
} sf_status;

const char *sf_status_string(sf_status status);

/* -------------------------------------------------------------- the layout */

enum { SF_SHARED = 0, SF_ISOLATED = 1, SF_GLOBAL = 2 };

/*
 * The segment tables of a batch of sequences, concatenated.
 * Sequence b owns segments seg_ptr[b] .. seg_ptr[b+1]-1; segment s covers
 * positions [seg_end[s-1], seg_end[s]) of its sequence (0 for its first
 * segment), so the layout length of sequence b is seg_end[seg_ptr[b+1]-1].
 */
typedef struct {
    int32_t batch;
    const int32_t *seg_ptr;  /* [batch + 1], seg_ptr[0] == 0, increasing     */
    const int32_t *seg_end;  /* [seg_ptr[batch]], strictly increasing per seq */
    const uint8_t *seg_kind; /* [seg_ptr[batch]], SF_SHARED/ISOLATED/GLOBAL  */
    const float *seg_bias;   /* [seg_ptr[batch]] or NULL for all zero        */
} sf_layouts;

/* Checks a host segment table: sizes, order, kinds, finite biases. */
sf_status sf_layouts_validate(const sf_layouts *layouts);

/* Layout length of sequence b (host table). */
int32_t sf_layout_length(const sf_layouts *layouts, int32_t b);

/*
 * Position ids of sequence b, written to out[0 .. length-1] (host).
 * mode 0 = contiguous: 0 .. length-1.
 * mode 1 = aligned: every isolated segment of a maximal run of isolated
 * segments starts at the same position (right after what precedes the run);
 * the tokens after the run continue after the longest segment of the run.
 */
sf_status sf_position_ids(const sf_layouts *layouts, int32_t b, int mode, int32_t length,
                          int64_t *out);

/* Segment index (relative to the sequence's first segment) of every position
 * 0 .. length-1 of sequence b; positions past the layout get the index
 * n_segments (the implicit global tail). */
sf_status sf_segment_ids(const sf_layouts *layouts, int32_t b, int32_t length, int32_t *out);

/*
 * How a rectangle of positions, queries [q0, q1) x keys [k0, k1) of sequence
 * b, relates to the mask: SF_BLOCK_EMPTY (no pair allowed), SF_BLOCK_FULL
 * (every pair allowed) or SF_BLOCK_PARTIAL. Positions must lie inside
 * [0, layout length + implicit tail). Cost: O(segments the rectangle touches).
 */
enum { SF_BLOCK_EMPTY = 0, SF_BLOCK_PARTIAL = 1, SF_BLOCK_FULL = 2 };
int sf_classify_block(const sf_layouts *layouts, int32_t b, int32_t q0, int32_t q1,
                      int32_t k0, int32_t k1);

/* ---------------------------------------------------------- the block mask */

/*
 * FlexAttention's block format (BlockMask.from_kv_blocks), one head:
 * query i of the [q_len] query axis sits at position i + (kv_len - q_len);
 * positions at or past a sequence's layout length are masked out (rows and
 * columns), exactly as create_block_mask pads with False.
 *
 *   kv_num_blocks      [batch, nq]      partial blocks per query block
 *   kv_indices         [batch, nq, nk]  their kv block indices, ascending,
 *                                       then the other blocks, ascending
 *   full_kv_num_blocks [batch, nq]      full blocks per query block
 *   full_kv_indices    [batch, nq, nk]  the same order
 * with nq = ceil(q_len / q_block), nk = ceil(kv_len / kv_block). A block is
 * full only when all q_block x kv_block pairs exist and are allowed.
 */
sf_status sf_block_mask_build(const sf_layouts *layouts, int32_t q_len, int32_t kv_len,
                              int32_t q_block, int32_t kv_block, int32_t *kv_num_blocks,
                              int32_t *kv_indices, int32_t *full_kv_num_blocks,
                              int32_t *full_kv_indices);

/* ---------------------------------------------------------- the attention */

typedef enum { SF_FLOAT32 = 0, SF_BFLOAT16 = 1, SF_FLOAT16 = 2 } sf_dtype;

/* One of q, k, v, out: element (b, h, t, d) lives at
 * data + b*stride_b + h*stride_h + t*stride_t + d. */
typedef struct {
    void *data;
    int64_t stride_b, stride_h, stride_t;
} sf_tensor;

/*
 * Where each sequence's rows lie and how long it is. Sequence b has q_len[b]
 * queries at token rows q_start[b] .. (of batch slot b of q and out) and
 * kv_len[b] keys at rows k_start[b] .. of k and v. Its queries are the last
 * q_len[b] positions: query i sits at position kv_len[b] - q_len[b] + i.
 *   padded batch:  q_start = k_start = 0, stride_b != 0
 *   packed varlen: q_start = cu_seqlens_q, k_start = cu_seqlens_k, stride_b = 0
 * max_q_len bounds q_len[] (it sizes the CUDA grid).
 */
typedef struct {
    int32_t batch;
    const int32_t *q_start, *q_len; /* [batch] each */
    const int32_t *k_start, *kv_len;
    int32_t max_q_len;
} sf_seqs;

typedef struct {
    int32_t heads_q, heads_kv; /* heads_q % heads_kv == 0: query head h reads kv head h / (heads_q / heads_kv) */
    int32_t head_dim;          /* CPU: 1..256; CUDA: 64 or 128 */
    float scale;               /* multiplies q.k before the bias */
    sf_dtype dtype;            /* of q, k, v and out alike; accumulation is float32 */
} sf_attn_params;

/*
 * out = softmax(mask(scale * q k^T + bias)) v for every sequence and head.
 * lse (optional, float32) gets the natural log-sum-exp of each row's scores,
 * lse[b*lse_stride_b + h*lse_stride_h + q_start[b] + i]; a row with no
 * allowed key gets out = 0 and lse = -inf. Rows of q/out outside q_len[b]
 * are not touched. n_threads <= 0 lets OpenMP decide. layouts may be NULL:
 * then every position is in the global tail (plain causal, no bias).
 */
sf_status sf_attention_cpu(const sf_layouts *layouts, const sf_seqs *seqs,
                           const sf_attn_params *params, sf_tensor q, sf_tensor k, sf_tensor v,
                           sf_tensor out, float *lse, int64_t lse_stride_b,
                           int64_t lse_stride_h, int n_threads);

/* ---------------------------------------------------------------- CUDA */

/*
 * The same functions on the GPU. Every pointer, the layouts' arrays and
 * the sf_seqs arrays included, is a device pointer; `stream` is a
 * cudaStream_t. Built only when the package is compiled with CUDA; without
 * it sf_cuda_available() returns 0 and the entry points SF_ERR_CUDA.
 * The sf_layouts and sf_seqs structs themselves live on the host; the
 * arrays they point to live on the device. A layout table with zero
 * segments for a sequence is allowed (everything is the global tail).
 *
 * `workspace` (device memory, `workspace_bytes` long) holds split-KV
 * partial results of the decode kernel; sf_cuda_workspace_bytes says how
 * much a call needs.
 */
int sf_cuda_available(void);

sf_status sf_cuda_attention(const sf_layouts *layouts, const sf_seqs *seqs,
                            const sf_attn_params *params, sf_tensor q, sf_tensor k, sf_tensor v,
                            sf_tensor out, float *lse, int64_t lse_stride_b,
                            int64_t lse_stride_h, void *workspace, size_t workspace_bytes,
                            void *stream);

/* Decode: every query is GLOBAL (q_len[b] = 1..8 new tokens at the end of
 * kv_len[b]), so the mask is causal and only the bias of each key's segment
 * applies. layouts may be NULL (no bias). */
sf_status sf_cuda_decode(const sf_layouts *layouts, const sf_seqs *seqs,
                         const sf_attn_params *params, sf_tensor q, sf_tensor k, sf_tensor v,
                         sf_tensor out, float *lse, int64_t lse_stride_b, int64_t lse_stride_h,
                         void *workspace, size_t workspace_bytes, void *stream);

size_t sf_cuda_workspace_bytes(int32_t batch, int32_t max_q_len, int32_t max_kv_len,
                               const sf_attn_params *params);

sf_status sf_cuda_block_mask_build(const sf_layouts *layouts, int32_t q_len, int32_t kv_len,
                                   int32_t q_block, int32_t kv_block, int32_t *kv_num_blocks,
                                   int32_t *kv_indices, int32_t *full_kv_num_blocks,
                                   int32_t *full_kv_indices, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* SEGFLEX_H */

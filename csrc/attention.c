/*
 * attention.c - segment-masked attention on the CPU.
 *
 *   out = softmax(mask(scale * q k^T + bias)) v
 *
 * computed tile by tile with an online softmax, so the [q_len, kv_len] score
 * matrix never exists.
 *
 * The work is cut into items: one sequence, one kv head, up to HEADS_PER_ITEM
 * of the query heads that read that kv head, and QB consecutive queries. The
 * query heads of a kv head are processed together so that every K/V tile,
 * once converted, serves all of them (GQA without copying K/V). An item walks
 * the KB-key blocks its queries can see (from the first key any of them may
 * see; causality bounds the last one), asks the layout how each block relates
 * to the mask, and
 *   EMPTY    skips it,
 *   FULL     runs it without evaluating the mask,
 *   PARTIAL  evaluates the mask per (query, key) from the segment ids, and
 *            on the diagonal scores only the keys up to each row group's
 *            last query.
 *
 * Every tile is converted to float32 in buffers owned by the thread, so the
 * three dtypes share one code path and all arithmetic is float32.
 *
 * Scores are kept in base-2 units (multiplied by log2(e)): the softmax then
 * needs exp2, which a short polynomial computes in loops the compiler can
 * vectorise (libm's expf would be a scalar call per score, as costly as the
 * dot product itself).
 *
 * The products use fmaf() on purpose: in ISO C mode the compiler may not
 * contract a*b+c into one fused multiply-add, and FMA doubles the throughput
 * of the two inner loops (built with -march=native on a CPU with FMA, fmaf
 * is one vector instruction; elsewhere it is still correct, only slower).
 */
#include "segflex.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum {
    QB = 32,             /* queries per item */
    KB = 32,             /* keys per block */
    HEADS_PER_ITEM = 4,  /* query heads of one kv head processed together */
    MAX_ROWS = QB * HEADS_PER_ITEM,
    ROWS = 4,            /* rows per micro-kernel call: they share each load of K or V */
    LANES = 16,          /* columns per accumulator of a micro-kernel (one 512-bit register) */
    MAX_HEAD_DIM = 256,
};

/* The micro-kernels and the softmax stay out of line: inlined into the item
 * loop, the compiler spills their accumulators to the stack and halves their
 * speed. */
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* ------------------------------------------------------- element conversion */

static inline float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* bfloat16 is the top half of a float32: widening is exact. */
static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    /* Round to nearest, ties to even: add just under half an ulp, plus one
     * when the kept part is odd. A carry into the exponent is correct
     * rounding, up to infinity. */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13)); /* inf, NaN */
    if (exp == 0) {                                                        /* zero, subnormal */
        float mag = (float)man * 0x1p-24f;                                 /* exact */
        return sign ? -mag : mag;
    }
    return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t f32_to_f16(float f)
{
    uint32_t u = f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return sign | 0x7e00u;  /* NaN stays a (quiet) NaN */
    if (u >= 0x477ff000u) return sign | 0x7c00u; /* 65520 and up round to infinity */
    if (u >= 0x38800000u) {                      /* a normal half */
        u += 0xfffu + ((u >> 13) & 1u);          /* round to nearest even on bit 13 */
        return sign | (uint16_t)((u >> 13) - (112u << 10));
    }
    /* A subnormal half (or zero): the value in units of 2^-24, rounded. */
    uint32_t exp = u >> 23, man = (u & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp; /* value = man * 2^-shift units; shift >= 14 */
    if (shift > 24) return sign; /* below half the smallest subnormal */
    uint32_t kept = man >> shift, rest = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (kept & 1u))) kept++;
    return sign | (uint16_t)kept;
}

static size_t dtype_size(sf_dtype dtype) { return dtype == SF_FLOAT32 ? 4 : 2; }

/* n elements at src, times `mul`, to dst[0], dst[stride], ... as float32. */
static void load_row(const void *src, sf_dtype dtype, int n, float mul, float *dst, int stride)
{
    if (dtype == SF_FLOAT32) {
        const float *x = (const float *)src;
        for (int i = 0; i < n; i++) dst[(size_t)i * stride] = x[i] * mul;
    } else if (dtype == SF_BFLOAT16) {
        const uint16_t *x = (const uint16_t *)src;
        for (int i = 0; i < n; i++) dst[(size_t)i * stride] = bf16_to_f32(x[i]) * mul;
    } else {
        const uint16_t *x = (const uint16_t *)src;
        for (int i = 0; i < n; i++) dst[(size_t)i * stride] = f16_to_f32(x[i]) * mul;
    }
}

/* n floats of src, times `mul`, to dst in dtype (rounded to nearest even). */
static void store_row(void *dst, sf_dtype dtype, int n, float mul, const float *src)
{
    if (dtype == SF_FLOAT32) {
        float *x = (float *)dst;
        for (int i = 0; i < n; i++) x[i] = src[i] * mul;
    } else if (dtype == SF_BFLOAT16) {
        uint16_t *x = (uint16_t *)dst;
        for (int i = 0; i < n; i++) x[i] = f32_to_bf16(src[i] * mul);
    } else {
        uint16_t *x = (uint16_t *)dst;
        for (int i = 0; i < n; i++) x[i] = f32_to_f16(src[i] * mul);
    }
}

/* --------------------------------------------------------------------- exp2 */

/*
 * 2^x for x <= 0, relative error about 1e-7; exactly 0 below -126 (so a
 * masked score, -inf, gives exactly 0), exactly 1 at 0, NaN for NaN. Split x
 * into an integer n and a fraction f in [-1/2, 1/2]: 2^x = 2^n * 2^f, 2^f by
 * its Taylor series (7 terms suffice on that interval), 2^n by building the
 * float's exponent field.
 */
static inline float exp2_nonpositive(float x)
{
    /* In [-126, 0] (NaN too goes to -126): 2^n stays a normal float and the
     * conversion to int below is always defined. */
    const float clamped = x >= -126.0f ? (x <= 0.0f ? x : 0.0f) : -126.0f;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float n = (clamped + shifter) - shifter;
    const float f = clamped - n;
    float p = 1.5252734e-5f;                   /* ln2^7 / 7! */
    p = fmaf(p, f, 1.5403530e-4f);             /* ln2^6 / 6! */
    p = fmaf(p, f, 1.3333558e-3f);             /* ln2^5 / 5! */
    p = fmaf(p, f, 9.6181291e-3f);             /* ln2^4 / 4! */
    p = fmaf(p, f, 5.5504109e-2f);             /* ln2^3 / 3! */
    p = fmaf(p, f, 2.4022651e-1f);             /* ln2^2 / 2! */
    p = fmaf(p, f, 6.9314718e-1f);             /* ln2 */
    p = fmaf(p, f, 1.0f);
    const float scale = bits_to_f32((uint32_t)((int32_t)n + 127) << 23);
    return x < -126.0f ? 0.0f : (x == x ? p * scale : x);
}

/* ------------------------------------------------------------- the tables */

/* What every item reads; built once per call, shared read-only by threads. */
typedef struct {
    const sf_layouts *layouts; /* NULL: no layout, every position is in the global tail */
    const sf_seqs *seqs;
    sf_dtype dtype;
    int heads_kv, group;   /* group = query heads per kv head */
    int heads_per_item;    /* query heads of one item */
    int chunks;            /* items per (kv head, query block) */
    int head_dim, dpad;    /* dpad: head_dim rounded up to LANES */
    float qscale;          /* scale * log2(e), folded into the queries */
    sf_tensor q, k, v, out;
    float *lse;
    int64_t lse_stride_b, lse_stride_h;
    /* Per position of every sequence, at pos_offset[b] + position: */
    const int64_t *pos_offset; /* [batch] */
    const int32_t *seg;        /* segment index (n_segments for the tail) */
    const uint8_t *kind;       /* kind of that segment */
    const float *key_bias;     /* its bias in base-2 units, or NULL when all are 0 */
    const int32_t *first_key;  /* the first key a query there may see */
    const int64_t *item_offset; /* [batch + 1]: the items of sequence b */
} plan;

/* A thread's buffers, reused by every item it runs. */
typedef struct {
    float *q;   /* [MAX_ROWS][dpad] queries times qscale; row r = head (r / n), query (r % n) */
    float *acc; /* [MAX_ROWS][dpad] unnormalised output */
    float *s;   /* [MAX_ROWS][KB] scores, then probabilities */
    float *kt;  /* [head_dim][KB] the K tile, transposed so a row of it is contiguous in keys */
    float *v;   /* [KB][dpad] the V tile; columns past head_dim stay 0 */
    float m[MAX_ROWS], l[MAX_ROWS], alpha[MAX_ROWS]; /* running max, running sum, rescale */
    int32_t pos[MAX_ROWS], seg[MAX_ROWS];
    uint8_t global[MAX_ROWS];
    int32_t key_seg[KB];
    uint8_t key_shared[KB];
} scratch;

static int64_t query_blocks(int32_t q_len) { return ((int64_t)q_len + QB - 1) / QB; }

/* The segment, kind, key bias and first visible key of every kv position of
 * every sequence. A global query may see key 0; any other query its own
 * segment's start, or the first shared segment's start if that is earlier. */
static sf_status build_position_tables(const sf_layouts *lay, const sf_seqs *seqs,
                                       int64_t *pos_offset, int32_t *seg, uint8_t *kind,
                                       float *key_bias, int32_t *first_key)
{
    int64_t at = 0;
    for (int32_t b = 0; b < seqs->batch; b++) {
        const int32_t len = seqs->kv_len[b];
        pos_offset[b] = at;
        if (!lay) { /* no layout: one global segment, bias 0 */
            memset(seg + at, 0, sizeof(int32_t) * (size_t)len);
            memset(kind + at, SF_GLOBAL, (size_t)len);
            memset(first_key + at, 0, sizeof(int32_t) * (size_t)len);
            at += len;
            continue;
        }
        const int32_t first = lay->seg_ptr[b], n = lay->seg_ptr[b + 1] - first;
        sf_status st = sf_segment_ids(lay, b, len, seg + at);
        if (st != SF_OK) return st;
        int32_t start = 0, first_shared = INT32_MAX;
        for (int32_t t = 0; t < len; t++) {
            const int32_t s = seg[at + t];
            kind[at + t] = s < n ? lay->seg_kind[first + s] : (uint8_t)SF_GLOBAL;
            if (key_bias) key_bias[at + t] = s < n ? lay->seg_bias[first + s] * LOG2E : 0.0f;
            if (t > 0 && s != seg[at + t - 1]) start = t;
            if (kind[at + t] == SF_SHARED && first_shared == INT32_MAX) first_shared = start;
            const int32_t own = start < first_shared ? start : first_shared;
            first_key[at + t] = kind[at + t] == SF_GLOBAL ? 0 : own;
        }
        at += len;
    }
    return SF_OK;
}

/* ---------------------------------------------------------- the micro-kernels */

/*
 * The two kernels index with ptrdiff_t and row pointers: CPython builds
 * extensions with -fwrapv, under which int indices cost a sign extension per
 * load in these loops (a third of their speed).
 */

/* s[r][j] = sum_d q[r][d] * kt[d][j] for ROWS rows and the keys j < n_keys
 * (rounded up to LANES; later columns are left as they were). */
NOINLINE static void scores_rows(const float *q, ptrdiff_t ldq, const float *kt,
                                 ptrdiff_t head_dim, ptrdiff_t n_keys, float *s)
{
    const float *q0 = q, *q1 = q + ldq, *q2 = q + 2 * ldq, *q3 = q + 3 * ldq;
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += LANES) {
        float s0[LANES] = {0}, s1[LANES] = {0}, s2[LANES] = {0}, s3[LANES] = {0};
        const float *kr = kt + j0;
        for (ptrdiff_t d = 0; d < head_dim; d++, kr += KB) {
            const float a0 = q0[d], a1 = q1[d], a2 = q2[d], a3 = q3[d];
            for (ptrdiff_t j = 0; j < LANES; j++) {
                s0[j] = fmaf(a0, kr[j], s0[j]);
                s1[j] = fmaf(a1, kr[j], s1[j]);
                s2[j] = fmaf(a2, kr[j], s2[j]);
                s3[j] = fmaf(a3, kr[j], s3[j]);
            }
        }
        memcpy(s + j0, s0, sizeof s0);
        memcpy(s + KB + j0, s1, sizeof s1);
        memcpy(s + 2 * KB + j0, s2, sizeof s2);
        memcpy(s + 3 * KB + j0, s3, sizeof s3);
    }
}

/* acc[r] = alpha[r] * acc[r] + sum_j p[r][j] * v[j] for ROWS rows. */
NOINLINE static void accumulate_rows(const float *p, const float *alpha, const float *v,
                                     ptrdiff_t n_keys, ptrdiff_t dpad, float *acc)
{
    const float *p0 = p, *p1 = p + KB, *p2 = p + 2 * KB, *p3 = p + 3 * KB;
    float *c0 = acc, *c1 = acc + dpad, *c2 = acc + 2 * dpad, *c3 = acc + 3 * dpad;
    for (ptrdiff_t d0 = 0; d0 < dpad; d0 += LANES) {
        float a0[LANES], a1[LANES], a2[LANES], a3[LANES];
        for (ptrdiff_t d = 0; d < LANES; d++) {
            a0[d] = c0[d0 + d] * alpha[0];
            a1[d] = c1[d0 + d] * alpha[1];
            a2[d] = c2[d0 + d] * alpha[2];
            a3[d] = c3[d0 + d] * alpha[3];
        }
        const float *vr = v + d0;
        for (ptrdiff_t j = 0; j < n_keys; j++, vr += dpad) {
            const float w0 = p0[j], w1 = p1[j], w2 = p2[j], w3 = p3[j];
            for (ptrdiff_t d = 0; d < LANES; d++) {
                a0[d] = fmaf(w0, vr[d], a0[d]);
                a1[d] = fmaf(w1, vr[d], a1[d]);
                a2[d] = fmaf(w2, vr[d], a2[d]);
                a3[d] = fmaf(w3, vr[d], a3[d]);
            }
        }
        memcpy(c0 + d0, a0, sizeof a0);
        memcpy(c1 + d0, a1, sizeof a1);
        memcpy(c2 + d0, a2, sizeof a2);
        memcpy(c3 + d0, a3, sizeof a3);
    }
}

/* ------------------------------------------------------------- one item */

static inline const char *element(const sf_tensor *t, size_t esize, int64_t b, int64_t h,
                                  int64_t row)
{
    const int64_t offset = b * t->stride_b + h * t->stride_h + row * t->stride_t; /* may be < 0 */
    return (const char *)t->data + (ptrdiff_t)offset * (ptrdiff_t)esize;
}

/* Queries i0 .. i0+n-1 of heads h0 .. h0+nh-1 into the row buffer, with the
 * position, segment and kind of each row; fresh softmax state. */
static void load_queries(const plan *P, scratch *S, int32_t b, int h0, int nh, int32_t i0, int n)
{
    const sf_seqs *sq = P->seqs;
    const size_t es = dtype_size(P->dtype);
    const int32_t first_pos = sq->kv_len[b] - sq->q_len[b] + i0;
    const int64_t at = P->pos_offset[b];
    const int rows = nh * n, rows_padded = (rows + ROWS - 1) / ROWS * ROWS;
    for (int r = 0; r < rows; r++) {
        const int h = h0 + r / n, i = r % n;
        load_row(element(&P->q, es, b, h, (int64_t)sq->q_start[b] + i0 + i), P->dtype, P->head_dim,
                 P->qscale, S->q + (size_t)r * P->dpad, 1);
        const int32_t pos = first_pos + i;
        S->pos[r] = pos;
        S->seg[r] = P->seg[at + pos];
        S->global[r] = P->kind[at + pos] == SF_GLOBAL;
    }
    /* Padding rows run through the micro-kernels; keep them finite. */
    memset(S->q + (size_t)rows * P->dpad, 0,
           sizeof(float) * (size_t)(rows_padded - rows) * P->dpad);
    memset(S->acc, 0, sizeof(float) * (size_t)rows_padded * P->dpad);
    for (int r = 0; r < rows_padded; r++) {
        S->m[r] = -INFINITY;
        S->l[r] = 0.0f;
        S->alpha[r] = 1.0f;
    }
}

/* Keys k0 .. k0+n_keys-1 of kv head kvh: K transposed into kt, V into v,
 * and the segment of each key for the mask. */
static void load_kv_tile(const plan *P, scratch *S, int32_t b, int kvh, int32_t k0, int n_keys)
{
    const size_t es = dtype_size(P->dtype);
    const int64_t row0 = (int64_t)P->seqs->k_start[b] + k0, at = P->pos_offset[b] + k0;
    for (int j = 0; j < n_keys; j++) {
        load_row(element(&P->k, es, b, kvh, row0 + j), P->dtype, P->head_dim, 1.0f, S->kt + j, KB);
        load_row(element(&P->v, es, b, kvh, row0 + j), P->dtype, P->head_dim, 1.0f,
                 S->v + (size_t)j * P->dpad, 1);
        S->key_seg[j] = P->seg[at + j];
        S->key_shared[j] = P->kind[at + j] == SF_SHARED;
    }
    /* Keys past the tile's end are masked, but their scores are still
     * computed: keep them finite. */
    for (int j = n_keys; j < KB; j++) {
        for (int d = 0; d < P->head_dim; d++) S->kt[(size_t)d * KB + j] = 0.0f;
        S->key_seg[j] = -1;
        S->key_shared[j] = 0;
    }
}

/*
 * Turns the scores of rows 0 .. rows-1 over keys k0 .. k0+KB-1 into
 * probabilities relative to each row's new running max, and updates the
 * running max and sum. `full`: every (row, key < n_keys) pair is allowed, so
 * only the key count bounds a row. `bias` (per key, or NULL) applies to
 * global rows only.
 */
NOINLINE static void softmax_rows(scratch *S, int rows, int32_t k0, int n_keys, int full,
                                  const float *bias)
{
    static const float no_bias[KB]; /* all 0: one code path with and without a bias */
    for (int r = 0; r < rows; r++) {
        float *s = S->s + (size_t)r * KB;
        const int global = S->global[r];
        const float *add = global && bias ? bias : no_bias; /* bias is for global queries only */

        /* Mask and bias the scores and take their max. */
        float mx = -INFINITY;
        if (full) { /* no mask: only the tile's length bounds the row */
#pragma omp simd reduction(max : mx)
            for (int j = 0; j < KB; j++) {
                const float x = j < n_keys ? s[j] + add[j] : -INFINITY;
                s[j] = x;
                mx = x > mx ? x : mx;
            }
        } else {
            /* The formula of segflex.h. Keys past the tile, or past the
             * columns scored, lie past this row's query: causality masks them. */
            const int32_t last = S->pos[r] - k0, own = S->seg[r];
#pragma omp simd reduction(max : mx)
            for (int j = 0; j < KB; j++) {
                const int allowed = j <= last && (global | (S->key_seg[j] == own) | S->key_shared[j]);
                const float x = allowed ? s[j] + add[j] : -INFINITY;
                s[j] = x;
                mx = x > mx ? x : mx;
            }
        }

        if (mx == -INFINITY) { /* nothing allowed here: the row is left as it was */
            memset(s, 0, sizeof(float) * KB);
            S->alpha[r] = 1.0f;
            continue;
        }
        const float m_old = S->m[r], m_new = m_old > mx ? m_old : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < KB; j++) {
            const float p = exp2_nonpositive(s[j] - m_new); /* -inf - m_new = -inf gives 0 */
            s[j] = p;
            sum += p;
        }
        /* The first allowed keys: there is nothing to rescale (m_old = -inf). */
        const float alpha = m_old == -INFINITY ? 0.0f : exp2_nonpositive(m_old - m_new);
        S->alpha[r] = alpha;
        S->l[r] = S->l[r] * alpha + sum;
        S->m[r] = m_new;
    }
}

/* Normalises the rows and writes them (and their lse) out. */
static void write_rows(const plan *P, scratch *S, int32_t b, int h0, int nh, int32_t i0, int n)
{
    const size_t es = dtype_size(P->dtype);
    const int32_t row0 = P->seqs->q_start[b] + i0;
    for (int r = 0; r < nh * n; r++) {
        const int h = h0 + r / n, i = r % n;
        const float l = S->l[r];
        /* l > 0 whenever one key was allowed: the max itself contributes 1. */
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        void *dst = (void *)element(&P->out, es, b, h, (int64_t)row0 + i);
        store_row(dst, P->dtype, P->head_dim, inv, S->acc + (size_t)r * P->dpad);
        if (P->lse) {
            const float lse = l > 0.0f ? (S->m[r] + log2f(l)) * LN2 : -INFINITY;
            P->lse[b * P->lse_stride_b + h * P->lse_stride_h + row0 + i] = lse;
        }
    }
}

/* sf_classify_block, or plain causality when there is no layout. */
static int classify(const plan *P, int32_t b, int32_t q0, int32_t q1, int32_t k0, int32_t k1)
{
    if (P->layouts) return sf_classify_block(P->layouts, b, q0, q1, k0, k1);
    if (k0 > q1 - 1) return SF_BLOCK_EMPTY;
    return k1 - 1 <= q0 ? SF_BLOCK_FULL : SF_BLOCK_PARTIAL;
}

/* Attention of queries i0 .. i0+n-1, query heads h0 .. h0+nh-1 (all reading
 * kv head kvh) of sequence b. */
static void run_item(const plan *P, scratch *S, int32_t b, int kvh, int h0, int nh, int32_t i0,
                     int n)
{
    const int32_t offset = P->seqs->kv_len[b] - P->seqs->q_len[b];
    const int32_t q0 = offset + i0, q1 = q0 + n; /* positions of the item's queries */
    const int rows = nh * n, rows_padded = (rows + ROWS - 1) / ROWS * ROWS;

    load_queries(P, S, b, h0, nh, i0, n);
    /* Blocks before the first key any of the rows may see are empty. */
    int32_t lowest = q1;
    for (int r = 0; r < rows; r++) {
        const int32_t f = P->first_key[P->pos_offset[b] + S->pos[r]];
        lowest = f < lowest ? f : lowest;
    }
    for (int32_t k0 = lowest / KB * KB; k0 < q1; k0 += KB) {
        /* Keys at or past q1 are masked for every query here (causality). */
        const int32_t k1 = q1 - k0 < KB ? q1 : k0 + KB;
        const int cls = classify(P, b, q0, q1, k0, k1);
        if (cls == SF_BLOCK_EMPTY) continue;
        const int n_keys = k1 - k0;

        load_kv_tile(P, S, b, kvh, k0, n_keys);
        /* Causality ends each group of rows at its last query: on the
         * diagonal, the keys past it are neither scored nor summed. The
         * softmax masks the columns left unscored. */
        int cols[MAX_ROWS / ROWS];
        for (int r = 0; r < rows_padded; r += ROWS) {
            const int last = r + ROWS <= rows ? r + ROWS - 1 : rows - 1;
            int32_t reach = 0;
            for (int i = r; i <= last; i++)
                if (S->pos[i] - k0 + 1 > reach) reach = S->pos[i] - k0 + 1;
            cols[r / ROWS] = reach < n_keys ? reach : n_keys;
            scores_rows(S->q + (size_t)r * P->dpad, P->dpad, S->kt, P->head_dim, cols[r / ROWS],
                        S->s + (size_t)r * KB);
        }

        const float *bias = P->key_bias ? P->key_bias + P->pos_offset[b] + k0 : NULL;
        softmax_rows(S, rows, k0, n_keys, cls == SF_BLOCK_FULL, bias);
        for (int r = rows; r < rows_padded; r++)
            memset(S->s + (size_t)r * KB, 0, sizeof(float) * KB);

        for (int r = 0; r < rows_padded; r += ROWS)
            accumulate_rows(S->s + (size_t)r * KB, S->alpha + r, S->v, cols[r / ROWS], P->dpad,
                            S->acc + (size_t)r * P->dpad);
    }
    write_rows(P, S, b, h0, nh, i0, n);
}

/* Item t -> (sequence, kv head, query heads, query block). Within a sequence
 * the items of one kv head are consecutive, so the threads walk the same K/V
 * rows together while they are still in cache; within a head the last query
 * blocks come first: under causality they are the longest, and starting them
 * early evens out the threads' loads. */
static void run_item_index(const plan *P, scratch *S, int64_t t)
{
    int32_t lo = 0, hi = P->seqs->batch - 1; /* the last b with item_offset[b] <= t */
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo + 1) / 2;
        if (P->item_offset[mid] <= t) lo = mid;
        else hi = mid - 1;
    }
    const int32_t b = lo;
    const int64_t blocks = query_blocks(P->seqs->q_len[b]), per_head = blocks * P->chunks;
    const int64_t local = t - P->item_offset[b], within = local % per_head;
    const int kvh = (int)(local / per_head), chunk = (int)(within / blocks);
    const int64_t block = blocks - 1 - within % blocks;
    const int h0 = kvh * P->group + chunk * P->heads_per_item;
    const int nh = P->group - chunk * P->heads_per_item < P->heads_per_item
                       ? P->group - chunk * P->heads_per_item
                       : P->heads_per_item;
    const int32_t i0 = (int32_t)(block * QB);
    const int n = P->seqs->q_len[b] - i0 < QB ? P->seqs->q_len[b] - i0 : QB;
    run_item(P, S, b, kvh, h0, nh, i0, n);
}

/* ------------------------------------------------------------ scratch */

static size_t round_up64(size_t bytes) { return (bytes + 63) / 64 * 64; }

static scratch *scratch_new(const plan *P)
{
    const size_t rows_bytes = round_up64(sizeof(float) * MAX_ROWS * (size_t)P->dpad);
    const size_t s_bytes = round_up64(sizeof(float) * MAX_ROWS * KB);
    const size_t kt_bytes = round_up64(sizeof(float) * (size_t)P->head_dim * KB);
    const size_t v_bytes = round_up64(sizeof(float) * KB * (size_t)P->dpad);
    const size_t total =
        round_up64(sizeof(scratch)) + 2 * rows_bytes + s_bytes + kt_bytes + v_bytes;
    char *mem = aligned_alloc(64, total);
    if (!mem) return NULL;
    memset(mem, 0, total); /* the V tile's padding columns must read as 0 */
    scratch *S = (scratch *)mem;
    char *at = mem + round_up64(sizeof(scratch));
    S->q = (float *)at, at += rows_bytes;
    S->acc = (float *)at, at += rows_bytes;
    S->s = (float *)at, at += s_bytes;
    S->kt = (float *)at, at += kt_bytes;
    S->v = (float *)at;
    return S;
}

/* ------------------------------------------------------------ the entry */

static int tensor_ok(const sf_tensor *t) { return t->data != NULL; }

static sf_status check_arguments(const sf_layouts *layouts, const sf_seqs *seqs,
                                 const sf_attn_params *params, const sf_tensor *q,
                                 const sf_tensor *k, const sf_tensor *v, const sf_tensor *out)
{
    if (!seqs || !params) return SF_ERR_ARGUMENT;
    if (params->dtype != SF_FLOAT32 && params->dtype != SF_BFLOAT16 && params->dtype != SF_FLOAT16)
        return SF_ERR_DTYPE;
    if (params->head_dim < 1 || params->head_dim > MAX_HEAD_DIM) return SF_ERR_HEAD_DIM;
    if (params->heads_q < 1 || params->heads_kv < 1 || params->heads_q % params->heads_kv != 0)
        return SF_ERR_ARGUMENT;
    if (!isfinite(params->scale)) return SF_ERR_ARGUMENT;
    if (seqs->batch < 0 || (layouts && seqs->batch != layouts->batch)) return SF_ERR_ARGUMENT;
    if (seqs->batch == 0) return SF_OK;
    if (!seqs->q_start || !seqs->q_len || !seqs->k_start || !seqs->kv_len) return SF_ERR_ARGUMENT;
    sf_status st = layouts ? sf_layouts_validate(layouts) : SF_OK;
    if (st != SF_OK) return st;
    int64_t queries = 0;
    for (int32_t b = 0; b < seqs->batch; b++) {
        const int32_t n = seqs->q_len[b];
        if (n < 0 || n > seqs->kv_len[b] || n > seqs->max_q_len) return SF_ERR_ARGUMENT;
        if (seqs->q_start[b] < 0 || seqs->k_start[b] < 0) return SF_ERR_ARGUMENT;
        queries += seqs->q_len[b];
    }
    if (queries > 0 && (!tensor_ok(q) || !tensor_ok(k) || !tensor_ok(v) || !tensor_ok(out)))
        return SF_ERR_ARGUMENT;
    return SF_OK;
}

/* Counts the items of every sequence and runs them all on the threads. */
static sf_status run_items(plan *P, int64_t *item_offset, int n_threads)
{
    const sf_seqs *seqs = P->seqs;
    int64_t items = 0;
    for (int32_t b = 0; b < seqs->batch; b++) {
        item_offset[b] = items;
        items += query_blocks(seqs->q_len[b]) * P->heads_kv * P->chunks;
    }
    item_offset[seqs->batch] = items;
    P->item_offset = item_offset;

    int failed = 0;
#ifdef _OPENMP
    const int threads = n_threads > 0 ? n_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads) if (items > 1) reduction(| : failed)
#else
    (void)n_threads;
#endif
    {
        scratch *S = scratch_new(P);
        if (!S) failed = 1;
        /* Items differ in cost (causality, skipped blocks): hand them out one by one. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < items; t++)
            if (S) run_item_index(P, S, t);
        free(S);
    }
    return failed ? SF_ERR_NO_MEMORY : SF_OK;
}

/* The contract is in segflex.h. layouts may also be NULL (decode without a
 * layout): then the mask is plain causality and there is no bias. */
sf_status sf_attention_cpu(const sf_layouts *layouts, const sf_seqs *seqs,
                           const sf_attn_params *params, sf_tensor q, sf_tensor k, sf_tensor v,
                           sf_tensor out, float *lse, int64_t lse_stride_b,
                           int64_t lse_stride_h, int n_threads)
{
    sf_status st = check_arguments(layouts, seqs, params, &q, &k, &v, &out);
    if (st != SF_OK || seqs->batch == 0) return st;
    const int32_t batch = seqs->batch;

    plan P = {0};
    P.layouts = layouts;
    P.seqs = seqs;
    P.dtype = params->dtype;
    P.heads_kv = params->heads_kv;
    P.group = params->heads_q / params->heads_kv;
    P.heads_per_item = P.group < HEADS_PER_ITEM ? P.group : HEADS_PER_ITEM;
    P.chunks = (P.group + P.heads_per_item - 1) / P.heads_per_item;
    P.head_dim = params->head_dim;
    P.dpad = (params->head_dim + LANES - 1) / LANES * LANES;
    P.qscale = params->scale * LOG2E;
    P.q = q, P.k = k, P.v = v, P.out = out;
    P.lse = lse, P.lse_stride_b = lse_stride_b, P.lse_stride_h = lse_stride_h;

    int64_t positions = 0;
    for (int32_t b = 0; b < batch; b++) positions += seqs->kv_len[b];
    /* offsets: [batch] position offsets, then [batch + 1] item offsets. */
    int64_t *offsets = malloc(sizeof(int64_t) * (2 * (size_t)batch + 1));
    int32_t *seg = malloc(sizeof(int32_t) * (size_t)(positions + 1));
    uint8_t *kind = malloc((size_t)positions + 1);
    const int biased = layouts && layouts->seg_bias;
    /* The softmax reads a whole tile of biases, past a sequence's end too. */
    float *key_bias = biased ? calloc((size_t)positions + KB, sizeof(float)) : NULL;
    int32_t *first_key = malloc(sizeof(int32_t) * (size_t)(positions + 1));
    if (!offsets || !seg || !kind || (biased && !key_bias) || !first_key) st = SF_ERR_NO_MEMORY;
    if (st == SF_OK)
        st = build_position_tables(layouts, seqs, offsets, seg, kind, key_bias, first_key);
    if (st == SF_OK) {
        P.pos_offset = offsets, P.seg = seg, P.kind = kind, P.key_bias = key_bias;
        P.first_key = first_key;
        st = run_items(&P, offsets + batch, n_threads);
    }
    free(offsets);
    free(seg);
    free(kind);
    free(key_bias);
    free(first_key);
    return st;
}

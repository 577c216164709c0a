/*
 * layout.c - segment tables: validation, lengths, position ids, segment ids,
 * and the classification of a rectangle of (query, key) positions.
 *
 * Everything here reads the compact segment table only (a few integers per
 * segment), never a dense mask: that is what keeps the block-mask builder and
 * the attention kernels independent of the sequence length squared.
 */
#include <math.h>
#include "segflex.h"

const char *sf_status_string(sf_status status)
{
    switch (status) {
    case SF_OK: return "ok";
    case SF_ERR_ARGUMENT: return "invalid argument";
    case SF_ERR_LAYOUT: return "malformed segment table";
    case SF_ERR_DTYPE: return "unsupported dtype";
    case SF_ERR_HEAD_DIM: return "unsupported head dimension";
    case SF_ERR_NO_MEMORY: return "out of memory";
    case SF_ERR_CUDA: return "CUDA error";
    case SF_ERR_WORKSPACE: return "workspace too small";
    }
    return "unknown error";
}

sf_status sf_layouts_validate(const sf_layouts *lay)
{
    if (!lay || lay->batch < 0 || !lay->seg_ptr) return SF_ERR_ARGUMENT;
    if (lay->seg_ptr[0] != 0) return SF_ERR_LAYOUT;
    for (int32_t b = 0; b < lay->batch; b++) {
        int32_t first = lay->seg_ptr[b], last = lay->seg_ptr[b + 1];
        if (last < first) return SF_ERR_LAYOUT;
        int32_t prev_end = 0;
        for (int32_t s = first; s < last; s++) {
            if (lay->seg_end[s] <= prev_end) return SF_ERR_LAYOUT;
            if (lay->seg_kind[s] > SF_GLOBAL) return SF_ERR_LAYOUT;
            if (lay->seg_bias && !isfinite(lay->seg_bias[s])) return SF_ERR_LAYOUT;
            prev_end = lay->seg_end[s];
        }
    }
    return SF_OK;
}

int32_t sf_layout_length(const sf_layouts *lay, int32_t b)
{
    int32_t first = lay->seg_ptr[b], last = lay->seg_ptr[b + 1];
    return last > first ? lay->seg_end[last - 1] : 0;
}

sf_status sf_segment_ids(const sf_layouts *lay, int32_t b, int32_t length, int32_t *out)
{
    if (length < 0 || (length > 0 && !out)) return SF_ERR_ARGUMENT;
    int32_t first = lay->seg_ptr[b], n = lay->seg_ptr[b + 1] - first;
    int32_t pos = 0;
    for (int32_t s = 0; s < n && pos < length; s++) {
        int32_t end = lay->seg_end[first + s];
        for (; pos < end && pos < length; pos++) out[pos] = s;
    }
    for (; pos < length; pos++) out[pos] = n; /* the implicit global tail */
    return SF_OK;
}

sf_status sf_position_ids(const sf_layouts *lay, int32_t b, int mode, int32_t length,
                          int64_t *out)
{
    if (length < 0 || (length > 0 && !out) || (mode != 0 && mode != 1)) return SF_ERR_ARGUMENT;
    int32_t first = lay->seg_ptr[b], n = lay->seg_ptr[b + 1] - first;
    int32_t pos = 0;        /* token index */
    int64_t next_id = 0;    /* position id of the next token outside a run */
    for (int32_t s = 0; s < n && pos < length; s++) {
        int32_t start = s ? lay->seg_end[first + s - 1] : 0, end = lay->seg_end[first + s];
        if (mode == 1 && lay->seg_kind[first + s] == SF_ISOLATED) {
            /* A run of isolated segments: each restarts at the run's start
             * (Parallel Context Windows); afterwards continue past the
             * longest of them. */
            int64_t run_start = next_id, run_end = next_id;
            for (; s < n && lay->seg_kind[first + s] == SF_ISOLATED; s++) {
                start = s ? lay->seg_end[first + s - 1] : 0;
                end = lay->seg_end[first + s];
                for (int32_t t = start; t < end && t < length; t++)
                    out[t] = run_start + (t - start);
                if (run_start + (end - start) > run_end) run_end = run_start + (end - start);
            }
            s--; /* the for loop's s++ moves past the run */
            next_id = run_end;
            pos = end;
            continue;
        }
        for (int32_t t = start; t < end && t < length; t++) out[t] = next_id++;
        pos = end;
    }
    for (; pos < length; pos++) out[pos] = next_id++;
    return SF_OK;
}

/*
 * Segment s of sequence b as a half-open range and a kind. Index n (one past
 * the last segment) is the implicit global tail, which is unbounded.
 */
typedef struct {
    int32_t start, end, kind;
} seg_span;

static seg_span segment_span(const sf_layouts *lay, int32_t b, int32_t s)
{
    int32_t first = lay->seg_ptr[b], n = lay->seg_ptr[b + 1] - first;
    seg_span span;
    if (s >= n) {
        span.start = n ? lay->seg_end[first + n - 1] : 0;
        span.end = INT32_MAX;
        span.kind = SF_GLOBAL;
        return span;
    }
    span.start = s ? lay->seg_end[first + s - 1] : 0;
    span.end = lay->seg_end[first + s];
    span.kind = lay->seg_kind[first + s];
    return span;
}

/* Index of the segment holding position pos (binary search over the ends). */
static int32_t segment_of(const sf_layouts *lay, int32_t b, int32_t pos)
{
    int32_t first = lay->seg_ptr[b], lo = 0, hi = lay->seg_ptr[b + 1] - first;
    while (lo < hi) { /* first segment whose end is > pos; n if none */
        int32_t mid = (lo + hi) / 2;
        if (lay->seg_end[first + mid] > pos) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/*
 * The rectangle is cut into pieces where it crosses segment boundaries. For a
 * query piece in segment sq and a key piece in segment sk, the segment rule
 * is constant, so the piece is empty, full or partial by causality alone:
 * keys [c, d) against queries [a, b) are all allowed when d-1 <= a, none
 * when c > b-1. The rectangle is full/empty when every piece is.
 */
int sf_classify_block(const sf_layouts *lay, int32_t b, int32_t q0, int32_t q1, int32_t k0,
                      int32_t k1)
{
    if (q1 <= q0 || k1 <= k0 || k0 > q1 - 1) return SF_BLOCK_EMPTY;
    int any = 0, all = 1;
    for (int32_t sq = segment_of(lay, b, q0);; sq++) {
        seg_span qs = segment_span(lay, b, sq);
        int32_t a = qs.start > q0 ? qs.start : q0, e = qs.end < q1 ? qs.end : q1;
        for (int32_t sk = segment_of(lay, b, k0);; sk++) {
            seg_span ks = segment_span(lay, b, sk);
            int32_t c = ks.start > k0 ? ks.start : k0, d = ks.end < k1 ? ks.end : k1;
            int visible = qs.kind == SF_GLOBAL || sq == sk || ks.kind == SF_SHARED;
            if (visible && c <= e - 1) any = 1;          /* some causal pair */
            if (!visible || d - 1 > a) all = 0;          /* some pair masked */
            if (any && !all) return SF_BLOCK_PARTIAL;
            if (ks.end >= k1) break;
        }
        if (qs.end >= q1) break;
    }
    return all ? SF_BLOCK_FULL : (any ? SF_BLOCK_PARTIAL : SF_BLOCK_EMPTY);
}

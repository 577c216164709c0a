/*
 * module.c - the Python binding, and the only file that knows CPython.
 *
 * The binding is deliberately thin: Python (python/segflex/ops.py) validates
 * every argument and hands over raw addresses (tensor.data_ptr(),
 * ndarray.ctypes.data), element strides and sizes; this file unpacks them into
 * the structs of segflex.h, releases the GIL and calls the C core. Passing
 * addresses instead of linking libtorch keeps one binary valid for every torch
 * version, and for NumPy alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "segflex.h"

typedef unsigned long long addr_t;

/* Raises the Python exception for a failed C call. */
static PyObject *raise_status(const char *what, sf_status st)
{
    PyObject *type = st == SF_ERR_NO_MEMORY ? PyExc_MemoryError
                     : st == SF_ERR_CUDA    ? PyExc_RuntimeError
                                            : PyExc_ValueError;
    PyErr_Format(type, "segflex %s: %s", what, sf_status_string(st));
    return NULL;
}

/* (batch, seg_ptr, seg_end, seg_kind, seg_bias) -> sf_layouts */
static sf_layouts make_layouts(int batch, addr_t ptr, addr_t end, addr_t kind, addr_t bias)
{
    sf_layouts lay;
    lay.batch = batch;
    lay.seg_ptr = (const int32_t *)(uintptr_t)ptr;
    lay.seg_end = (const int32_t *)(uintptr_t)end;
    lay.seg_kind = (const uint8_t *)(uintptr_t)kind;
    lay.seg_bias = (const float *)(uintptr_t)bias;
    return lay;
}

#define LAYOUT_FMT "iKKKK"
#define LAYOUT_ARGS &batch, &seg_ptr, &seg_end, &seg_kind, &seg_bias
#define LAYOUT_DECL int batch; addr_t seg_ptr, seg_end, seg_kind, seg_bias

/* validate(layout...) -> None, raises on a malformed table */
static PyObject *py_validate(PyObject *self, PyObject *args)
{
    LAYOUT_DECL;
    if (!PyArg_ParseTuple(args, LAYOUT_FMT, LAYOUT_ARGS)) return NULL;
    sf_layouts lay = make_layouts(batch, seg_ptr, seg_end, seg_kind, seg_bias);
    sf_status st = sf_layouts_validate(&lay);
    if (st != SF_OK) return raise_status("layouts", st);
    Py_RETURN_NONE;
}

/* position_ids(layout..., b, mode, length, out_addr) */
static PyObject *py_position_ids(PyObject *self, PyObject *args)
{
    LAYOUT_DECL;
    int b, mode, length;
    addr_t out;
    if (!PyArg_ParseTuple(args, LAYOUT_FMT "iiiK", LAYOUT_ARGS, &b, &mode, &length, &out))
        return NULL;
    sf_layouts lay = make_layouts(batch, seg_ptr, seg_end, seg_kind, seg_bias);
    sf_status st = sf_position_ids(&lay, b, mode, length, (int64_t *)(uintptr_t)out);
    if (st != SF_OK) return raise_status("position_ids", st);
    Py_RETURN_NONE;
}

/* segment_ids(layout..., b, length, out_addr) */
static PyObject *py_segment_ids(PyObject *self, PyObject *args)
{
    LAYOUT_DECL;
    int b, length;
    addr_t out;
    if (!PyArg_ParseTuple(args, LAYOUT_FMT "iiK", LAYOUT_ARGS, &b, &length, &out)) return NULL;
    sf_layouts lay = make_layouts(batch, seg_ptr, seg_end, seg_kind, seg_bias);
    sf_status st = sf_segment_ids(&lay, b, length, (int32_t *)(uintptr_t)out);
    if (st != SF_OK) return raise_status("segment_ids", st);
    Py_RETURN_NONE;
}

/* block_mask(layout..., q_len, kv_len, q_block, kv_block, num, idx, full_num, full_idx, cuda, stream) */
static PyObject *py_block_mask(PyObject *self, PyObject *args)
{
    LAYOUT_DECL;
    int q_len, kv_len, q_block, kv_block, cuda;
    addr_t num, idx, full_num, full_idx, stream;
    if (!PyArg_ParseTuple(args, LAYOUT_FMT "iiiiKKKKpK", LAYOUT_ARGS, &q_len, &kv_len, &q_block,
                          &kv_block, &num, &idx, &full_num, &full_idx, &cuda, &stream))
        return NULL;
    sf_layouts lay = make_layouts(batch, seg_ptr, seg_end, seg_kind, seg_bias);
    sf_status st;
    Py_BEGIN_ALLOW_THREADS
    if (cuda)
        st = sf_cuda_block_mask_build(&lay, q_len, kv_len, q_block, kv_block,
                                      (int32_t *)(uintptr_t)num, (int32_t *)(uintptr_t)idx,
                                      (int32_t *)(uintptr_t)full_num,
                                      (int32_t *)(uintptr_t)full_idx, (void *)(uintptr_t)stream);
    else
        st = sf_block_mask_build(&lay, q_len, kv_len, q_block, kv_block,
                                 (int32_t *)(uintptr_t)num, (int32_t *)(uintptr_t)idx,
                                 (int32_t *)(uintptr_t)full_num, (int32_t *)(uintptr_t)full_idx);
    Py_END_ALLOW_THREADS
    if (st != SF_OK) return raise_status("build_block_mask", st);
    Py_RETURN_NONE;
}

/*
 * attention(op, layout..., seqs..., params..., q, k, v, out (each addr + 3 strides),
 *           lse, lse_stride_b, lse_stride_h, workspace, workspace_bytes, stream, n_threads)
 * op: 0 = CPU attention, 1 = CUDA prefill, 2 = CUDA decode.
 */
static PyObject *py_attention(PyObject *self, PyObject *args)
{
    int op, n_threads;
    LAYOUT_DECL;
    int seq_batch, max_q_len;
    addr_t q_start, q_len, k_start, kv_len;
    sf_attn_params p;
    int dtype;
    addr_t data[4];
    long long sb[4], sh[4], st_[4];
    addr_t lse, workspace, stream;
    long long lse_sb, lse_sh;
    unsigned long long workspace_bytes;
    if (!PyArg_ParseTuple(args,
                          "i" LAYOUT_FMT "iKKKKi" "iiifi" "KLLL" "KLLL" "KLLL" "KLLL" "KLL" "KKK" "i",
                          &op, LAYOUT_ARGS, &seq_batch, &q_start, &q_len, &k_start, &kv_len,
                          &max_q_len, &p.heads_q, &p.heads_kv, &p.head_dim, &p.scale, &dtype,
                          &data[0], &sb[0], &sh[0], &st_[0], &data[1], &sb[1], &sh[1], &st_[1],
                          &data[2], &sb[2], &sh[2], &st_[2], &data[3], &sb[3], &sh[3], &st_[3],
                          &lse, &lse_sb, &lse_sh, &workspace, &workspace_bytes, &stream,
                          &n_threads))
        return NULL;
    p.dtype = (sf_dtype)dtype;
    sf_layouts lay = make_layouts(batch, seg_ptr, seg_end, seg_kind, seg_bias);
    sf_seqs seqs;
    seqs.batch = seq_batch;
    seqs.q_start = (const int32_t *)(uintptr_t)q_start;
    seqs.q_len = (const int32_t *)(uintptr_t)q_len;
    seqs.k_start = (const int32_t *)(uintptr_t)k_start;
    seqs.kv_len = (const int32_t *)(uintptr_t)kv_len;
    seqs.max_q_len = max_q_len;
    sf_tensor t[4];
    for (int i = 0; i < 4; i++) {
        t[i].data = (void *)(uintptr_t)data[i];
        t[i].stride_b = sb[i];
        t[i].stride_h = sh[i];
        t[i].stride_t = st_[i];
    }
    const sf_layouts *layp = seg_ptr ? &lay : NULL;
    float *lsep = (float *)(uintptr_t)lse;
    void *ws = (void *)(uintptr_t)workspace, *strm = (void *)(uintptr_t)stream;
    sf_status st;
    Py_BEGIN_ALLOW_THREADS
    if (op == 0)
        st = sf_attention_cpu(layp, &seqs, &p, t[0], t[1], t[2], t[3], lsep, lse_sb, lse_sh,
                              n_threads);
    else if (op == 1)
        st = sf_cuda_attention(layp, &seqs, &p, t[0], t[1], t[2], t[3], lsep, lse_sb, lse_sh, ws,
                               (size_t)workspace_bytes, strm);
    else
        st = sf_cuda_decode(layp, &seqs, &p, t[0], t[1], t[2], t[3], lsep, lse_sb, lse_sh, ws,
                            (size_t)workspace_bytes, strm);
    Py_END_ALLOW_THREADS
    if (st != SF_OK) return raise_status(op == 2 ? "decode" : "attention", st);
    Py_RETURN_NONE;
}

/* cuda_workspace_bytes(batch, max_q_len, max_kv_len, heads_q, heads_kv, head_dim) */
static PyObject *py_cuda_workspace_bytes(PyObject *self, PyObject *args)
{
    int batch, max_q_len, max_kv_len;
    sf_attn_params p = {0};
    if (!PyArg_ParseTuple(args, "iiiiii", &batch, &max_q_len, &max_kv_len, &p.heads_q,
                          &p.heads_kv, &p.head_dim))
        return NULL;
    return PyLong_FromSize_t(sf_cuda_workspace_bytes(batch, max_q_len, max_kv_len, &p));
}

static PyObject *py_cuda_available(PyObject *self, PyObject *noargs)
{
    return PyBool_FromLong(sf_cuda_available());
}

static PyMethodDef methods[] = {
    {"validate", py_validate, METH_VARARGS, "Check a segment table."},
    {"position_ids", py_position_ids, METH_VARARGS, "Position ids of one sequence."},
    {"segment_ids", py_segment_ids, METH_VARARGS, "Segment index of every position."},
    {"block_mask", py_block_mask, METH_VARARGS, "FlexAttention block format (CPU or CUDA)."},
    {"attention", py_attention, METH_VARARGS, "Segment attention (CPU, CUDA prefill/decode)."},
    {"cuda_workspace_bytes", py_cuda_workspace_bytes, METH_VARARGS, "Decode workspace size."},
    {"cuda_available", py_cuda_available, METH_NOARGS, "Whether CUDA kernels were built."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "segflex._C",
                                    "segflex's C and CUDA core.", -1, methods};

PyMODINIT_FUNC PyInit__C(void)
{
    return PyModule_Create(&module);
}

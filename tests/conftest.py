"""Shared test settings and helpers.

The oracle (``tests/oracle.py``) never imports segflex; the helpers here turn
its plain layout specs into ``segflex.SegmentLayout`` objects.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import oracle` from any test

from hypothesis import HealthCheck, settings  # noqa: E402

# Deterministic by default so a red CI run can be replayed; set
# SEGFLEX_HYPOTHESIS=explore for fresh random examples each run.
settings.register_profile(
    "default",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
settings.register_profile(
    "explore",
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("SEGFLEX_HYPOTHESIS", "default"))

try:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
except ImportError:  # pragma: no cover
    torch = None


# ------------------------------------------------------------ the SDPA peer

if torch is not None:
    import torch.nn.functional as F

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    # absolute floors of the error rule, and lse tolerances, per input precision
    FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}
    LSE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def randn(shape, dtype, seed):
    """Seeded standard normal tensor, drawn in fp32 and then cast."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def sdpa_rows(q, k, v, mask, bias, scale):
    """torch SDPA in q's precision on one sequence's rows that have keys.

    q ``[Hq, Lq, D]``, k/v ``[Hkv, Lk, D]`` (repeated to Hq heads), mask/bias
    ``[Lq, Lk]`` NumPy. Returns ``[Hq, Lq, D]`` with zeros in rows without keys."""
    Hq, Hkv = q.shape[0], k.shape[0]
    k = k.repeat_interleave(Hq // Hkv, dim=0)
    v = v.repeat_interleave(Hq // Hkv, dim=0)
    live = mask.any(axis=1)
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    if not live.any():
        return out
    rows = torch.from_numpy(live)
    m = torch.from_numpy(mask[live])
    if bias is not None and np.any(bias[live] != 0):
        add = torch.from_numpy(bias[live]).to(q.dtype)
        attn_mask = torch.where(m, add, torch.tensor(float("-inf"), dtype=q.dtype))
    else:
        attn_mask = m
    out[:, rows] = F.scaled_dot_product_attention(q[:, rows], k, v, attn_mask=attn_mask, scale=scale)
    return out


def to_layout(spec):
    """A segflex.SegmentLayout from an oracle.Spec."""
    import segflex

    biases = None if spec.biases is None else list(spec.biases)
    return segflex.SegmentLayout(lengths=list(spec.lengths), kinds=list(spec.kinds), biases=biases)


def to_layouts(specs):
    return [to_layout(s) for s in specs]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped on machines without CUDA."""
    has_cuda = torch is not None and torch.cuda.is_available()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

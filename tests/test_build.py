"""The built package: no libtorch link, works without torch, and its pictures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import segflex
from oracle import mask_from_formula

TESTS = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ linking


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_extension_does_not_link_torch():
    from segflex import _C

    path = _C.__file__
    assert os.path.isfile(path)
    deps = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libtorch_python", "libtorch_cpu"):
        assert lib not in deps, f"{path} links {lib}:\n{deps}"


# ------------------------------------------------------------- CUDA sources


CUDA_SOURCES = os.path.join(os.path.dirname(TESTS), "csrc", "cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_sources_compile_for_ampere(tmp_path):
    """Every CUDA source compiles for sm_80 too (SEGFLEX_CUDA_ARCHS="90a;80"), where the
    Hopper-only kernels are compiled empty. (The install compiles the default, sm_90a.) No GPU
    needed; the flags are setup.py's."""
    arch = "80"
    for name in sorted(os.listdir(CUDA_SOURCES)):
        if not name.endswith(".cu"):
            continue
        cmd = ["nvcc", "-c", os.path.join(CUDA_SOURCES, name), "-o", str(tmp_path / "k.o"),
               "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DSEGFLEX_WITH_CUDA",
               f"-I{os.path.dirname(CUDA_SOURCES)}", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{name} for sm_{arch}:\n{done.stderr[-3000:]}"


# ---------------------------------------------------------- without torch

NO_TORCH = textwrap.dedent(r'''
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        """Makes `import torch` fail, as on a machine without it."""
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not installed here")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker failed")

    import math
    import numpy as np
    import segflex
    from oracle import Spec, attention_reference, block_summary, mask_from_formula, spec_bias, spec_mask

    spec = Spec((5, 9, 7, 8, 3), ("shared", "isolated", "isolated", "isolated", "global"),
                (0.0, -math.log(3), -math.log(3), -math.log(3), 0.0))
    lay = segflex.SegmentLayout(lengths=list(spec.lengths), kinds=list(spec.kinds), biases=list(spec.biases))
    assert len(lay) == 32
    assert np.array_equal(lay.dense_mask(), mask_from_formula(spec.lengths, spec.kinds))
    assert lay.position_ids(mode="aligned").max() == 5 + 9 + 3 - 1

    # block mask on NumPy: the partial/full flags are the oracle's blocks
    bm = segflex.build_block_mask([lay, segflex.SegmentLayout(lengths=[20], kinds=["isolated"])],
                                  q_block_size=16, kv_block_size=8)
    for b, m in enumerate([spec_mask(spec), mask_from_formula([20], ["isolated"], q_len=32, kv_len=32)]):
        partial, full = block_summary(m, 16, 8)
        kvn, kvi = np.asarray(bm.kv_num_blocks)[b, 0], np.asarray(bm.kv_indices)[b, 0]
        fn, fi = np.asarray(bm.full_kv_num_blocks)[b, 0], np.asarray(bm.full_kv_indices)[b, 0]
        for r in range(partial.shape[0]):
            assert sorted(kvi[r, :kvn[r]].tolist()) == np.nonzero(partial[r])[0].tolist(), (b, r)
            assert sorted(fi[r, :fn[r]].tolist()) == np.nonzero(full[r])[0].tolist(), (b, r)

    # attention on NumPy fp32
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 32, 16), dtype=np.float32)
    k = rng.standard_normal((1, 2, 32, 16), dtype=np.float32)
    v = rng.standard_normal((1, 2, 32, 16), dtype=np.float32)
    out, lse = segflex.attention(q, k, v, [lay], return_lse=True)
    ref, ref_lse = attention_reference(q[0], k[0], v[0], spec_mask(spec), spec_bias(spec))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.abs(out[0] - ref).max() < 1e-5, np.abs(out[0] - ref).max()
    assert np.abs(lse[0] - ref_lse).max() < 1e-4

    # decode on NumPy fp32
    kc = rng.standard_normal((1, 2, 40, 16), dtype=np.float32)
    qd = rng.standard_normal((1, 4, 1, 16), dtype=np.float32)
    od = segflex.decode(qd, kc, kc, np.array([35]), layouts=[lay])
    assert od.shape == qd.shape and np.isfinite(od).all()

    text = segflex.show(lay)
    assert "\u25a0" in text
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch got imported"
    print("NUMPY-ONLY OK")
''')


def test_import_and_numpy_paths_without_torch():
    env = dict(os.environ)
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, env=env,
                         cwd=TESTS, timeout=300)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "NUMPY-ONLY OK" in res.stdout


# ----------------------------------------------------------------- pictures

ROW = re.compile(r"^\s*(?:(?P<label>[SEG]\d+(?:/[SEG]\d+)*)\s+)?(?P<pos>\d+)\s+(?P<cells>[■·](?:\s+[■·])*)\s*$")


def parse_show(text: str):
    """(column positions, [(label, row position, cells)]) of segflex.show's text view."""
    rows = []
    header = None
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows.append((m.group("label"), int(m.group("pos")), m.group("cells").split()))
        elif re.fullmatch(r"\s*(\d+\s+)*\d+\s*", line) and header is None and line.strip():
            header = [int(x) for x in line.split()]
    return header, rows


def seed_layout(generated=10):
    # the seed's example: 5 paraphrase prompts, ~248 tokens with the generated tail
    prompts = [[1] * 47, [2] * 46, [3] * 47, [4] * 48, [5] * 46]
    return segflex.SegmentLayout.seed_format(prompts=prompts, separator=[9], generated=generated)


def test_show_has_the_seed_features(capsys):
    lay = seed_layout()
    text = segflex.show(lay)
    printed = capsys.readouterr().out
    assert text.strip() and text.strip() in printed  # it prints what it returns
    assert "■" in text and "·" in text
    header, rows = parse_show(text)
    n = len(rows)
    assert 15 <= n <= 40, f"{n} sampled positions; the seed showed about 25"
    positions = [p for _, p, _ in rows]
    assert positions == sorted(positions) and len(set(positions)) == n
    if header is not None:
        assert header == positions, "rows and columns sample the same positions"
    # every row has one cell per sampled column, and the cells are the mask
    mask = mask_from_formula(list(lay.lengths), list(lay.kinds))
    for label, p, cells in rows:
        assert len(cells) == n
        assert [c == "■" for c in cells] == [bool(mask[p, c]) for c in positions], f"row {p}"
    # S#/E# on every segment start/end, G0 at the first generated position
    labels = {}
    for label, p, _ in rows:
        for part in (label or "").split("/"):
            if part:
                labels.setdefault(part[0], set()).add(p)
    starts = np.cumsum([0] + list(lay.lengths))[:-1]
    ends = np.cumsum(list(lay.lengths)) - 1
    gen_start = len(lay) - 10
    assert "G" in labels and gen_start in labels["G"]
    assert any(lbl == "G0" and p == gen_start for lbl, p, _ in rows)
    for s, e in zip(starts, ends):
        if s != gen_start:
            assert s in labels.get("S", set()), f"segment start {s} has no S label"
        assert e in labels.get("E", set()), f"segment end {e} has no E label"


def test_show_short_layout_shows_every_position():
    lay = segflex.SegmentLayout(lengths=[3, 4, 2], kinds=["shared", "isolated", "global"])
    _, rows = parse_show(segflex.show(lay))
    assert [p for _, p, _ in rows] == list(range(9))
    mask = mask_from_formula([3, 4, 2], ["shared", "isolated", "global"])
    for _, p, cells in rows:
        assert [c == "■" for c in cells] == mask[p].tolist()


def test_show_long_layout_stays_small():
    lay = segflex.SegmentLayout.seed_format(prompts=[[7] * 400] * 5, separator=[1, 2], generated=16)
    _, rows = parse_show(segflex.show(lay))
    assert 15 <= len(rows) <= 45


def test_save_png(tmp_path):
    path = tmp_path / "mask.png"
    segflex.save_png(seed_layout(), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 100
    # a str path works too
    p2 = str(tmp_path / "mask2.png")
    segflex.save_png(segflex.SegmentLayout(lengths=[2, 2], kinds=["isolated", "global"]), p2)
    assert open(p2, "rb").read(4) == b"\x89PNG"

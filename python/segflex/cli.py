"""The ``segflex`` command line.

    segflex mask      print (and draw) the mask of a layout
    segflex check     build check: a 5-paraphrase layout through the C kernels vs a float64 oracle

Errors come out as one line (``segflex: error: ...``) and exit status 2; ``--traceback``
shows the whole story.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


# ----------------------------------------------------------------------------- mask
def _parse_segments(spec: str):
    """'shared:40,isolated:12,isolated:15,global:3' -> SegmentLayout."""
    from .layout import SegmentLayout
    lengths, kinds = [], []
    for item in spec.split(","):
        kind, _, n = item.strip().partition(":")
        if not n.isdigit():
            raise ValueError(f"--segments item {item!r} must look like kind:length")
        kinds.append(kind)
        lengths.append(int(n))
    return SegmentLayout(lengths, kinds)


def _demo_layout(paraphrases: int = 5, prefix: int = 60, para: int = 14, cue: int = 3,
                 generated: int = 4):
    """The default self-ensemble layout: shared prefix, isolated paraphrases, global answer."""
    import math
    from .layout import SegmentLayout
    lengths = [prefix] + [para + (i % 3) for i in range(paraphrases)] + [cue, generated]
    kinds = ["shared"] + ["isolated"] * paraphrases + ["global", "global"]
    biases = [0.0] + [-math.log(paraphrases)] * paraphrases + [0.0, 0.0]
    return SegmentLayout(lengths, kinds, biases)


def cmd_mask(args: argparse.Namespace) -> int:
    from .mask import save_png, show
    layout = _parse_segments(args.segments) if args.segments else _demo_layout(args.paraphrases)
    show(layout, positions=args.positions)
    if args.png:
        save_png(layout, args.png)
        print(f"wrote {args.png}")
    return 0


# ----------------------------------------------------------------------------- check
def _reference(q, k, v, layout, scale):
    """float64 attention on the dense mask, written out the obvious way."""
    mask = layout.dense_mask()
    bias = layout.dense_bias().astype(np.float64)
    group = q.shape[1] // k.shape[1]
    out = np.zeros(q.shape, dtype=np.float64)
    for h in range(q.shape[1]):
        s = q[0, h].astype(np.float64) @ k[0, h // group].astype(np.float64).T * scale + bias
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[0, h] = (p / p.sum(axis=1, keepdims=True)) @ v[0, h // group].astype(np.float64)
    return out


def cmd_check(args: argparse.Namespace) -> int:
    from .mask import build_block_mask, save_png, show
    from .ops import attention
    layout = _demo_layout(args.paraphrases)
    show(layout)
    if args.png:
        save_png(layout, args.png)
        print(f"wrote {args.png}")
    blocks = build_block_mask([layout], block_size=16).dense_blocks()[0]
    counts = {name: int((blocks == code).sum()) for code, name in enumerate(("empty", "partial", "full"))}
    print(f"block mask (16x16 blocks): {counts}")
    rng = np.random.default_rng(args.seed)
    L, hq, hkv, d = len(layout), 6, 2, 64
    q = rng.standard_normal((1, hq, L, d), dtype=np.float32)
    k = rng.standard_normal((1, hkv, L, d), dtype=np.float32)
    v = rng.standard_normal((1, hkv, L, d), dtype=np.float32)
    t0 = time.perf_counter()
    out = attention(q, k, v, [layout])
    elapsed = time.perf_counter() - t0
    ref = _reference(q, k, v, layout, 1 / np.sqrt(d))
    err = float(np.abs(out - ref).max())
    ok = err < 1e-4
    print(f"attention L={L} heads={hq}/{hkv} d={d} fp32: {elapsed * 1e3:.2f} ms, "
          f"max |segflex - float64 reference| = {err:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segflex", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("mask", help="print and draw the mask of a layout")
    p.add_argument("--segments", help="layout as kind:length,... (default: a 5-paraphrase "
                   "self-ensemble layout)")
    p.add_argument("--paraphrases", type=int, default=5, help="paraphrases of the default layout")
    p.add_argument("--positions", type=int, default=25, help="positions to sample in the text view")
    p.add_argument("--png", help="also draw the whole mask to this PNG file")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("check", help="run the C kernels on a 5-paraphrase layout against a "
                       "float64 reference")
    p.add_argument("--paraphrases", type=int, default=5, help="number of paraphrases")
    p.add_argument("--png", default="mask.png", help="where to draw the mask ('' to skip)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the test tensors")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("segflex: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line, not a traceback
        if args.traceback:
            raise
        print(f"segflex: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

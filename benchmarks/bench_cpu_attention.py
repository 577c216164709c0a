"""CPU prefill attention: segflex against PyTorch's scaled_dot_product_attention.

Layouts are the self-ensemble prompt shape: N isolated paraphrase segments of S
tokens each, then a G-token global tail ("5x400+16"). Three ways to compute the
same attention are timed:

  segflex      segflex.attention (block skipping, GQA without copies)
  sdpa-dense   SDPA with the dense bool mask, K/V repeated to the query heads
  sdpa-loop    SDPA per isolated segment (causal, on its own), then the global
               tail rows over the whole prefix with a small [G, L] mask

K/V repetition and mask construction are done once, outside the timed region,
so the SDPA rows are timed at their best. Useful GFLOP/s counts only allowed
(query, key) pairs: 4 * head_dim * pairs * query heads / time. The speedup
column is that row's time divided by segflex's time in the same config.

    python benchmarks/bench_cpu_attention.py --threads 2 --configs 5x48+16,5x400+16
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import segflex

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    """N isolated segments of `seg_len` tokens followed by a `tail`-token global segment."""

    name: str
    n_segments: int
    seg_len: int
    tail: int

    @property
    def length(self) -> int:
        return self.n_segments * self.seg_len + self.tail

    def layout(self) -> segflex.SegmentLayout:
        lengths = [self.seg_len] * self.n_segments + ([self.tail] if self.tail else [])
        kinds = ["isolated"] * self.n_segments + (["global"] if self.tail else [])
        return segflex.SegmentLayout(lengths=lengths, kinds=kinds)


def parse_config(text: str) -> Config:
    """'5x400+16' -> 5 isolated segments of 400 tokens and a 16-token global tail."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:\+(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--configs entries look like 5x400+16, got {text!r}")
    n, s, g = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if n < 1 or s < 1:
        raise ValueError(f"--configs entry {text!r} needs at least one segment of one token")
    return Config(text.strip(), n, s, g)


def dense_mask(cfg: Config) -> torch.Tensor:
    """The mask of segflex.h written out for this layout shape: [L, L] bool."""
    seg = torch.cat([torch.full((cfg.seg_len,), i) for i in range(cfg.n_segments)]
                    + [torch.full((cfg.tail,), cfg.n_segments)])
    is_global = seg == cfg.n_segments
    pos = torch.arange(cfg.length)
    causal = pos[None, :] <= pos[:, None]
    return causal & (is_global[:, None] | (seg[:, None] == seg[None, :]))


def time_methods(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time in seconds of each method, after two warm-up calls.

    The methods take turns, one call each per round, so that anything else
    the machine does meanwhile slows them alike. Methods whose calls take over
    2 s get one warm-up call and at most 3 timed ones, so the largest dense
    configs stay affordable."""
    rounds = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        fn()
        slow = time.perf_counter() - t0 > 2.0
        if not slow:
            fn()
        rounds[name] = min(repeats, 3) if slow else repeats
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(max(rounds.values())):
        for name, fn in methods.items():
            if i < rounds[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def sdpa_segment_loop(q, k_rep, v_rep, cfg: Config) -> torch.Tensor:
    """Each isolated segment alone (causal), then the tail rows over the prefix."""
    outs = []
    for i in range(cfg.n_segments):
        s = slice(i * cfg.seg_len, (i + 1) * cfg.seg_len)
        outs.append(F.scaled_dot_product_attention(q[:, :, s], k_rep[:, :, s], v_rep[:, :, s],
                                                   is_causal=True))
    if cfg.tail:
        p = cfg.n_segments * cfg.seg_len
        # tail row t sits at position p + t and sees keys 0 .. p + t
        tail_mask = torch.arange(cfg.length)[None, :] <= (p + torch.arange(cfg.tail))[:, None]
        outs.append(F.scaled_dot_product_attention(q[:, :, p:], k_rep, v_rep, attn_mask=tail_mask))
    return torch.cat(outs, dim=2)


def reference_float64(q, k, v, mask) -> torch.Tensor:
    """Dense-mask attention in float64, one head at a time (bounded memory), K/V
    heads shared by query-head groups: the accuracy yardstick."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        qh, kh, vh = q[:, h].double(), k[:, h // group].double(), v[:, h // group].double()
        s = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out[:, h] = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ vh
    return out


def run_config(cfg: Config, args, dtype, with_error: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    L, D = cfg.length, args.head_dim
    q = torch.randn(1, args.heads_q, L, D, generator=gen).to(dtype)
    k = torch.randn(1, args.heads_kv, L, D, generator=gen).to(dtype)
    v = torch.randn(1, args.heads_kv, L, D, generator=gen).to(dtype)
    layout = cfg.layout()
    mask = dense_mask(cfg)
    group = args.heads_q // args.heads_kv
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    methods = {
        "segflex": lambda: segflex.attention(q, k, v, [layout]),
        "sdpa-dense": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask),
        "sdpa-loop": lambda: sdpa_segment_loop(q, k_rep, v_rep, cfg),
    }
    flops = 4.0 * D * int(mask.sum()) * args.heads_q
    ref = reference_float64(q, k, v, mask) if with_error else None
    errors = {name: float((fn().double() - ref).abs().max()) if ref is not None else None
              for name, fn in methods.items()}
    seconds = time_methods(methods, args.repeats)
    rows = [dict(config=cfg.name, method=name, seconds=seconds[name],
                 gflops=flops / seconds[name] / 1e9, err=errors[name]) for name in methods]
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = r["seconds"] / base
    return rows


def print_table(rows: list[dict], args) -> None:
    print(f"CPU prefill attention: {args.heads_q} query heads, {args.heads_kv} kv heads, "
          f"head_dim {args.head_dim}, {args.dtype}, {args.threads} threads, "
          f"median of {args.repeats} runs (at most 3 for calls over 2 s), methods taking turns; "
          f"1-min load average {args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    header = (f"{'config':<11} {'L':>5} {'method':<11} {'time ms':>9} {'useful GFLOP/s':>15} "
              f"{'segflex speedup':>16} {'max |err| vs fp64':>18}")
    print(header)
    print("-" * len(header))
    for r in rows:
        err = f"{r['err']:.2e}" if r["err"] is not None else "-"
        speed = "-" if r["method"] == "segflex" else f"{r['speedup']:.2f}x"
        print(f"{r['config']:<11} {r['length']:>5} {r['method']:<11} {r['seconds'] * 1e3:>9.2f} "
              f"{r['gflops']:>15.1f} {speed:>16} {err:>18}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and segflex threads (default 2)")
    ap.add_argument("--configs", default="5x48+16,5x400+16,8x1024+16",
                    help="comma-separated NxS+G layouts (default %(default)s)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method (default 5)")
    ap.add_argument("--heads-q", type=int, default=24)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.heads_q % args.heads_kv:
        ap.error("--heads-q must be a multiple of --heads-kv")

    args.load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    os.environ["SEGFLEX_NUM_THREADS"] = str(args.threads)
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    # The float64 reference is dense: only for the smallest config, and only
    # while its [L, L] score matrix stays small.
    smallest = min(configs, key=lambda c: c.length)
    if smallest.length > 4096:
        smallest = None
    rows = []
    for cfg in configs:
        for r in run_config(cfg, args, DTYPES[args.dtype], with_error=cfg is smallest):
            r["length"] = cfg.length
            rows.append(r)
    print_table(rows, args)


if __name__ == "__main__":
    main()

"""Prefill benchmark: segflex against FlexAttention and SDPA on segment layouts.

    python benchmarks/bench_attention.py --device cuda [--quick] [--json out.json]

Configs (24 query / 8 KV heads, d=128, bf16), batch 1: isolated segments, with 16 global
tail tokens (5x48+16, 5x400+16, 8x1024+16, 16x2048+16: the self-ensemble prompt's shape)
and without (8x1024, 16x2048); and a packed batch of 32 questions of 5x(40..60)+16. Methods, all timed as CUDA-graph replays (median of CUDA-event
timings after warm-up, so launch gaps of the Python callers stay out; a replay holds enough
calls to last at least 0.5 ms, so its own launch latency stays out too):

  segflex op      torch.ops.segflex.attention (output allocation + geometry included);
                  the public wrapper adds host-side checks (timed eagerly, JSON only)
  segflex kernel  the CUDA kernel alone (geometry and output prepared once)
  flex            torch.compile(flex_attention) with its BlockMask (mask build separate)
  sdpa causal     SDPA dense causal (a lower bound: it ignores the segments)
  sdpa mask       SDPA with the dense boolean mask
  sdpa loop       one SDPA call per segment (the tail against every key)

Useful TFLOP/s count only allowed (q, k) pairs: 4 * pairs * head_dim * heads_q. The SM
clock (median of readings between repetitions, gpu_clock.py) is reported for the segflex
kernel and flex: under sustained load the GPU lowers it to stay within its power limit.
On an H100 the segflex kernel runs 16x2048+16 at the 700 W power limit, and right after
seconds of other work at that limit (the SDPA columns, the op's own timing) it ran 4-7%
slower than after a pause. So every method's timing starts once the GPU has cooled back to
near its idle temperature (gpu_clock.rest, at most 5 s), and the kernel is timed a second
time right after the SDPA columns without that rest: the "hot" column (JSON: "segflex
kernel, no rest"), its speed under sustained load.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np

from gpu_clock import ClockSamples, rest as rest_gpu


def _torch():
    import torch
    return torch


MIN_REPLAY_MS = 0.5  # a replay of the calls timed lasts at least this long


class Timing(NamedTuple):
    ms: float            # median milliseconds per call
    mode: str            # "graph" or "eager"
    mhz: float | None    # median SM clock between the timed repetitions (None without NVML)
    watts: float | None  # median power draw, likewise
    celsius: int | None  # GPU temperature when the timing started


def _replay_ms(run) -> float:
    torch = _torch()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    run()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def bench(fn, inner: int | None = None, reps: int = 30, graph: bool = True,
          rest: bool = True) -> Timing:
    """Median milliseconds per call of fn: CUDA-graph replays of `inner` calls, else eager.

    The time of a replay includes the latency of launching it (a few microseconds), which
    is not the calls' own. Unless `inner` is given, a graph of 10 calls whose replay takes
    less than MIN_REPLAY_MS is captured again with proportionally more calls (at most 500),
    so that this latency stays a small part of each call's time, the same way for every
    method. The SM clock and the power draw are read after every repetition. With `rest`,
    the timing starts once the GPU has cooled to near its idle temperature (gpu_clock.rest),
    so that what ran before does not set the clock of what is timed."""
    celsius = rest_gpu() if rest else None
    adapt = inner is None
    inner = 10 if inner is None else inner
    torch = _torch()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    mode = "graph"
    run = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()

            def capture(n):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(n):
                        fn()
                return g

            g = capture(inner)
            g.replay()
            if adapt and (ms := _replay_ms(g.replay)) < MIN_REPLAY_MS:
                inner = min(500, math.ceil(inner * MIN_REPLAY_MS / max(ms, 1e-3)))
                del g
                g = capture(inner)
            run = g.replay
        except Exception as exc:  # some callers cannot be captured: time them eagerly
            print(f"  (graph capture failed: {type(exc).__name__}: {str(exc)[:80]}; eager)",
                  file=sys.stderr)
            torch.cuda.synchronize()
            run = None
    if run is None:
        mode = "eager"

        def run():
            for _ in range(inner):
                fn()
    run()
    torch.cuda.synchronize()
    clocks = ClockSamples()
    times = []
    for _ in range(reps):
        times.append(_replay_ms(run) / inner)
        clocks.sample()
    return Timing(statistics.median(times), mode, clocks.median_mhz(), clocks.median_watts(),
                  celsius)


def allowed_pairs(layout) -> int:
    """Pairs the mask allows (dense count, from the definition)."""
    ends = np.cumsum(layout.lengths)
    starts = ends - np.asarray(layout.lengths)
    total, shared_before = 0, 0
    for s, e, kind in zip(starts, ends, layout.kinds):
        n = int(e - s)
        if kind == "global":
            total += n * int(s) + n * (n + 1) // 2
        else:
            total += n * shared_before + n * (n + 1) // 2
        if kind == "shared":
            shared_before += n
    return total


def configs(quick: bool):
    import segflex
    rng = np.random.default_rng(0)
    out = []
    for n, seg, tail in ((5, 48, 16), (5, 400, 16), (8, 1024, 0), (8, 1024, 16), (16, 2048, 0),
                         (16, 2048, 16)):
        if quick and n * seg > 9000:
            continue
        if tail:
            lay = segflex.SegmentLayout([seg] * n + [tail], ["isolated"] * n + ["global"])
            out.append((f"{n}x{seg}+{tail}", [lay]))
        else:
            lay = segflex.SegmentLayout([seg] * n, ["isolated"] * n)
            out.append((f"{n}x{seg}", [lay]))
    lays = []
    for _ in range(32):
        lens = [int(x) for x in rng.integers(40, 61, 5)]
        lays.append(segflex.SegmentLayout(lens + [16], ["isolated"] * 5 + ["global"]))
    out.append(("32 x 5x(40..60)+16", lays))
    return out


def run_config(name, lays, hq=24, hkv=8, d=128, flex_ok=True):
    torch = _torch()
    import segflex
    from segflex import ops
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    dev, dt = "cuda", torch.bfloat16
    scale = 1 / math.sqrt(d)
    lens = [len(x) for x in lays]
    B, L = len(lays), max(lens)
    total = sum(lens)
    pairs = sum(allowed_pairs(x) for x in lays)
    flops = 4.0 * pairs * d * hq
    g = torch.Generator(device=dev).manual_seed(0)
    row = {"config": name, "tokens": total, "pairs": pairs}

    # segflex: packed varlen (no padding)
    qp = torch.randn(total, hq, d, device=dev, dtype=dt, generator=g)
    kp = torch.randn(total, hkv, d, device=dev, dtype=dt, generator=g)
    vp = torch.randn(total, hkv, d, device=dev, dtype=dt, generator=g)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=dev)
    table = segflex.pack(lays, device=dev)
    # the custom op (output allocation and geometry included) as a compiled model calls it
    op = torch.ops.segflex.attention
    row["segflex op"] = bench(lambda: op(qp, kp, vp, table.seg_ptr, table.seg_end, table.seg_kind,
                                         table.seg_bias, cu, cu, max(lens), scale, False))[0]
    # the public wrapper validates on the host (a device-to-host copy): eager, host-bound
    row["segflex wrapper eager"] = bench(lambda: segflex.attention(
        qp, kp, vp, table, cu_seqlens_q=cu, cu_seqlens_k=cu), graph=False)[0]
    geo = ops._tensor_geometry(qp, kp, table.seg_ptr, table.seg_end, cu, cu, max(lens))
    out = torch.empty_like(qp)
    def kernel():
        ops._call(1, table, geo, qp, kp, vp, out, None, scale, hq, hkv, d, None,
                  torch.cuda.current_stream().cuda_stream)
    t = bench(kernel)
    row["segflex kernel"] = t.ms
    row["MHz segflex kernel"], row["W segflex kernel"] = t.mhz, t.watts
    row["C segflex kernel"] = t.celsius

    # the same data, padded [B, H, L, D], for the others
    q = torch.zeros(B, hq, L, d, device=dev, dtype=dt)
    k = torch.zeros(B, hkv, L, d, device=dev, dtype=dt)
    v = torch.zeros(B, hkv, L, d, device=dev, dtype=dt)
    for b in range(B):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        q[b, :, :lens[b]] = qp[sl].transpose(0, 1)
        k[b, :, :lens[b]] = kp[sl].transpose(0, 1)
        v[b, :, :lens[b]] = vp[sl].transpose(0, 1)

    # correctness spot check of the benchmarked kernel against SDPA with the dense mask
    dense = torch.zeros(B, 1, L, L, dtype=torch.bool, device=dev)
    for b, lay in enumerate(lays):
        m = torch.as_tensor(lay.dense_mask(), device=dev)
        dense[b, 0, :lens[b], :lens[b]] = m
        dense[b, 0, lens[b]:, 0] = True  # padding rows: anything finite
    if total <= 40000:
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                               enable_gqa=True)
        err = max((out[int(cu[b]):int(cu[b + 1])].transpose(0, 1).float() -
                   ref[b, :, :lens[b]].float()).abs().max().item() for b in range(B))
        row["max |segflex - sdpa mask|"] = err

    # flex: compiled, with create_block_mask (build time reported on its own)
    if flex_ok:
        try:
            mm = segflex.mask_mod(lays, device=dev)
            t0 = time.perf_counter()
            bm = create_block_mask(mm, B, None, L, L, device=dev, _compile=True)
            torch.cuda.synchronize()
            row["flex mask build first (ms)"] = (time.perf_counter() - t0) * 1e3
            row["flex create_block_mask"] = bench(
                lambda: create_block_mask(mm, B, None, L, L, device=dev, _compile=True),
                inner=1, reps=5, graph=False)[0]
            flex = torch.compile(flex_attention, dynamic=False)
            t = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
            row["flex"] = t.ms
            row["MHz flex"], row["W flex"] = t.mhz, t.watts
        except Exception as exc:
            print(f"  flex failed on {name}: {type(exc).__name__}: {str(exc)[:200]}",
                  file=sys.stderr)
    row["segflex mask build (GPU)"] = bench(
        lambda: segflex.build_block_mask(lays, device=dev), inner=1, reps=10, graph=False)[0]
    row["segflex mask kernel"] = mask_kernel_time(lays, table)

    row["sdpa causal"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))[0]
    if B * L * L <= 2**31:
        row["sdpa mask"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, enable_gqa=True), inner=1, reps=5, graph=L < 8192)[0]
    loop_out = torch.empty_like(q)

    def loop():
        for b, lay in enumerate(lays):
            s = 0
            for n, kind in zip(lay.lengths, lay.kinds):
                e = s + n
                if kind == "global":
                    tail_mask = torch.ones(n, e, dtype=torch.bool, device=dev).tril(e - n)
                    loop_out[b, :, s:e] = torch.nn.functional.scaled_dot_product_attention(
                        q[b:b + 1, :, s:e], k[b:b + 1, :, :e], v[b:b + 1, :, :e],
                        attn_mask=tail_mask, enable_gqa=True)[0]
                else:
                    loop_out[b, :, s:e] = torch.nn.functional.scaled_dot_product_attention(
                        q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                        is_causal=True, enable_gqa=True)[0]
                s = e
    row["sdpa loop"] = bench(loop, inner=1, reps=10)[0]
    # the kernel once more, right after the SDPA columns and without a rest: its speed
    # when the GPU is already hot from sustained work at the power limit
    t = bench(kernel, rest=False)
    row["segflex kernel, no rest"] = t.ms
    row["MHz segflex kernel, no rest"] = t.mhz
    row["useful TFLOP/s segflex"] = flops / (row["segflex kernel"] * 1e-3) / 1e12
    row["useful TFLOP/s segflex, no rest"] = flops / (row["segflex kernel, no rest"] * 1e-3) / 1e12
    if "flex" in row:
        row["useful TFLOP/s flex"] = flops / (row["flex"] * 1e-3) / 1e12
        row["speedup kernel vs flex"] = row["flex"] / row["segflex kernel"]
        row["speedup op vs flex"] = row["flex"] / row["segflex op"]
    return row


def mask_kernel_time(lays, table) -> float:
    """The GPU block-mask builder alone (table already on the device, outputs preallocated)."""
    torch = _torch()
    from segflex import _C
    L = max(len(x) for x in lays)
    nq = nk = -(-L // 128)
    B = len(lays)
    bufs = [torch.empty(s, dtype=torch.int32, device="cuda")
            for s in ((B, 1, nq), (B, 1, nq, nk), (B, 1, nq), (B, 1, nq, nk))]
    return bench(lambda: _C.block_mask(*table.c_args(), L, L, 128, 128,
                                       *(t.data_ptr() for t in bufs), True,
                                       torch.cuda.current_stream().cuda_stream))[0]


COLUMNS = ["segflex op", "segflex kernel", "flex", "sdpa causal", "sdpa mask", "sdpa loop"]


def print_table(rows) -> None:
    head = (f"{'config':<20}" + "".join(f"{c:>15}" for c in COLUMNS) +
            f"{'TF/s sf':>9}{'hot sf':>8}{'TF/s flex':>10}{'x flex':>8}{'flex mask':>11}{'sf mask':>9}"
            f"{'MHz sf':>8}{'MHz flex':>9}")
    print("times in microseconds (median, CUDA graph replays); mask columns: build time; "
          "hot sf: the kernel timed again right after the SDPA columns, with no rest")
    print(head)
    for r in rows:
        cells = "".join(f"{r[c] * 1e3:>15.1f}" if c in r else f"{'-':>15}" for c in COLUMNS)
        print(f"{r['config']:<20}{cells}"
              f"{r.get('useful TFLOP/s segflex', float('nan')):>9.1f}"
              f"{r.get('useful TFLOP/s segflex, no rest', float('nan')):>8.1f}"
              f"{r.get('useful TFLOP/s flex', float('nan')):>10.1f}"
              f"{r.get('speedup kernel vs flex', float('nan')):>8.2f}"
              f"{r.get('flex create_block_mask', float('nan')) * 1e3:>11.0f}"
              f"{r.get('segflex mask kernel', float('nan')) * 1e3:>9.1f}"
              f"{_mhz(r.get('MHz segflex kernel')):>8}{_mhz(r.get('MHz flex')):>9}")


def _mhz(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--quick", action="store_true", help="small configs only")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch = _torch()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = []
    for name, lays in configs(args.quick):
        row = run_config(name, lays, flex_ok=not args.no_flex)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

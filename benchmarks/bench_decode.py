"""Decode benchmark: segflex.decode against SDPA and compiled flex decoding.

    python benchmarks/bench_decode.py --device cuda [--json out.json]

One new token per sequence, 24 query / 8 KV heads, d=128, bf16; caches of 256, 2k, 8k and
32k tokens at batch 1, and 2k at batch 32. Reported: median time (CUDA-graph replays of
at least 0.5 ms, CUDA events; segflex and SDPA in alternating rounds), GB/s of K/V read
(each cached byte once), that rate as a fraction of the device-to-device copy bandwidth
measured in the same run (bytes read + bytes written), and the SM clock while each ran.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from bench_attention import _mhz, bench

ROUNDS = 3  # alternating timing rounds of segflex and SDPA per case


def copy_bandwidth() -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import torch
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), inner=2, reps=10).ms
    return 2 * n / (ms * 1e-3) / 1e9


def run_case(B: int, L: int, hq=24, hkv=8, d=128, flex_ok=True) -> dict:
    import torch
    import segflex
    from torch.nn.attention.flex_attention import flex_attention
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(L + B)
    q = torch.randn(B, hq, 1, d, device=dev, dtype=dt, generator=g)
    kc = torch.randn(B, hkv, L, d, device=dev, dtype=dt, generator=g)
    vc = torch.randn(B, hkv, L, d, device=dev, dtype=dt, generator=g)
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    kv_bytes = 2 * B * hkv * L * d * 2
    row = {"batch": B, "cache": L, "kv MB": kv_bytes / 1e6}
    ref = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
    row["max |segflex - sdpa|"] = (segflex.decode(q, kc, vc, lens).float() -
                                   ref.float()).abs().max().item()
    # segflex and SDPA come close at some sizes, so they are timed in alternating rounds
    # (neither always runs on the GPU the other has just warmed); each reports the median
    # of its rounds' medians.
    runs = {"segflex": lambda: segflex.decode(q, kc, vc, lens),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, kc, vc, enable_gqa=True)}
    timings = {m: [] for m in runs}
    for _ in range(ROUNDS):
        for m, fn in runs.items():
            timings[m].append(bench(fn))
    for m, ts in timings.items():
        row[m] = statistics.median(t.ms for t in ts)
        row[f"{m} rounds"] = [t.ms for t in ts]
        mhz = [t.mhz for t in ts if t.mhz is not None]
        row[f"MHz {m}"] = statistics.median(mhz) if mhz else None
    if flex_ok:
        try:
            flex = torch.compile(flex_attention, dynamic=False)
            row["flex"] = bench(lambda: flex(q, kc, vc, enable_gqa=True))[0]
        except Exception as exc:
            print(f"  flex failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    for m in ("segflex", "sdpa", "flex"):
        if m in row:
            row[f"GB/s {m}"] = kv_bytes / (row[m] * 1e-3) / 1e9
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {bw:.0f} GB/s (read + write)")
    rows = []
    for B, L in ((1, 256), (1, 2048), (1, 8192), (1, 32768), (32, 2048)):
        row = run_case(B, L, flex_ok=not args.no_flex)
        row["copy GB/s"] = bw
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("times in microseconds; GB/s of K/V read; % of the measured copy bandwidth")
    print(f"{'batch x cache':<15}{'segflex':>9}{'sdpa':>9}{'flex':>9}{'GB/s sf':>9}"
          f"{'GB/s sdpa':>10}{'GB/s flex':>10}{'% copy sf':>10}{'x sdpa':>8}{'MHz sf':>8}"
          f"{'MHz sdpa':>9}")
    for r in rows:
        f = r.get("flex", math.nan) * 1e3
        print(f"{str(r['batch']) + ' x ' + str(r['cache']):<15}{r['segflex'] * 1e3:>9.1f}"
              f"{r['sdpa'] * 1e3:>9.1f}{f:>9.1f}{r['GB/s segflex']:>9.0f}{r['GB/s sdpa']:>10.0f}"
              f"{r.get('GB/s flex', math.nan):>10.0f}{100 * r['GB/s segflex'] / bw:>10.1f}"
              f"{r['sdpa'] / r['segflex']:>8.2f}{_mhz(r.get('MHz segflex')):>8}"
              f"{_mhz(r.get('MHz sdpa')):>9}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

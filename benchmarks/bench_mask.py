"""Block mask construction: segflex's C builder against torch's create_block_mask.

Workload: the seed's layout, N isolated segments followed by a 16-token global
tail (the generated tokens), one sequence, block size 128, on the CPU.

Peers, both through ``torch.nn.attention.flex_attention.create_block_mask``
(eager, device="cpu"):

* ``seed mask_mod``: the mask function of the seed documents, segment start
  and end tensors and ``(q_in & kv_in).any()`` (vmap materialises a
  [Q, KV, segments] tensor);
* ``seg-id mask_mod``: a lookup in a per-position segment-id table.

Run: ``python benchmarks/bench_mask.py [--repeats N]``. Prints one
table of median wall times and speedups; peers that would not fit in memory
are reported as skipped rather than run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch.nn.attention.flex_attention import create_block_mask

import segflex

BLOCK = 128
TAIL = 16
CONFIGS = [(5, 48), (5, 400), (8, 1024), (16, 2048)]  # (segments, tokens per segment)


def seed_mask_mod(segment_positions: list[tuple[int, int]], generated_start_idx: int):
    """The seed documents' mask function (tensor ops only, as they wrote it for vmap)."""
    segment_starts = torch.tensor([start for start, _ in segment_positions])
    segment_ends = torch.tensor([end for _, end in segment_positions])

    def mask_mod(b, h, q_idx, kv_idx):
        q_in_segment = (q_idx >= segment_starts) & (q_idx < segment_ends)
        kv_in_segment = (kv_idx >= segment_starts) & (kv_idx < segment_ends)
        same_segment = (q_in_segment & kv_in_segment).any()
        in_generation = q_idx >= generated_start_idx
        causal = q_idx >= kv_idx
        return (same_segment | in_generation) & causal

    return mask_mod


def segment_id_mask_mod(lengths: list[int], kinds: list[str]):
    """Segment-id lookup: same segment, or a global query, or a shared key; causal."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    kind_of = torch.tensor([{"shared": 0, "isolated": 1, "global": 2}[k] for k in kinds])
    is_global = kind_of[seg] == 2
    is_shared = kind_of[seg] == 0

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((seg[q_idx] == seg[kv_idx]) | is_global[q_idx] | is_shared[kv_idx])

    return mask_mod


def timings_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: first-call costs (vmap tracing, allocator) are not what we compare
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(timings_ms(fn, repeats))


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def same_blocks(ours, ref) -> bool:
    return all(np.array_equal(np.asarray(getattr(ours, n)), getattr(ref, n).numpy())
               for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"))


def run(repeats: int, torch_repeats: int) -> list[dict]:
    rows = []
    for n_seg, seg_len in CONFIGS:
        lengths = [seg_len] * n_seg + [TAIL]
        kinds = ["isolated"] * n_seg + ["global"]
        L = sum(lengths)
        layout = segflex.SegmentLayout(lengths=lengths, kinds=kinds)
        row = {"config": f"{n_seg}x{seg_len}+{TAIL}", "tokens": L}

        t = timings_ms(lambda: segflex.build_block_mask([layout], block_size=BLOCK), repeats)
        row["segflex_ms"], row["segflex_min_ms"] = statistics.median(t), min(t)
        # segflex's OpenMP runtime is the process's libgomp, which torch's thread
        # setting drives too: one thread shows the builder without thread start/join
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        row["segflex_1t_ms"] = median_ms(lambda: segflex.build_block_mask([layout], block_size=BLOCK),
                                         repeats)
        torch.set_num_threads(threads)
        row["segflex_flex_ms"] = median_ms(
            lambda: segflex.build_block_mask([layout], block_size=BLOCK).to_flex(), repeats)
        ours = segflex.build_block_mask([layout], block_size=BLOCK)

        # the dense [L, L] mask create_block_mask builds, plus vmap's intermediates
        reps = torch_repeats if L <= 10_000 else 1
        free = available_bytes()
        positions, start = [], 0
        for n in lengths[:-1]:
            positions.append((start, start + n))
            start += n
        seed_bytes = L * L * (n_seg + 4)  # [Q, KV, segments] bools from `.any()`
        if seed_bytes < 0.6 * free:
            mod = seed_mask_mod(positions, L - TAIL)
            row["seed_ms"] = median_ms(
                lambda: create_block_mask(mod, 1, None, L, L, device="cpu", BLOCK_SIZE=BLOCK), reps)
            # the seed's mask has no shared kind; on this layout it equals the formula
            row["seed_same"] = same_blocks(ours, create_block_mask(mod, 1, None, L, L, device="cpu",
                                                                   BLOCK_SIZE=BLOCK))
        else:
            row["seed_ms"] = None
            row["seed_skip"] = f"needs ~{seed_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
        seg_bytes = L * L * 12
        if seg_bytes < 0.6 * free:
            mod = segment_id_mask_mod(lengths, kinds)
            row["segid_ms"] = median_ms(
                lambda: create_block_mask(mod, 1, None, L, L, device="cpu", BLOCK_SIZE=BLOCK), reps)
            row["segid_same"] = same_blocks(ours, create_block_mask(mod, 1, None, L, L, device="cpu",
                                                                    BLOCK_SIZE=BLOCK))
        else:
            row["segid_ms"] = None
            row["segid_skip"] = f"needs ~{seg_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
        row["torch_repeats"] = reps
        rows.append(row)
        print(".", end="", flush=True)
    print()
    return rows


def fmt_ms(x) -> str:
    if x is None:
        return "skipped"
    return f"{x:.3f}" if x < 1 else f"{x:.1f}"


def table(rows: list[dict]) -> str:
    head = ("| layout | tokens | segflex build (ms) | (min) | 1 thread (ms) | + to_flex (ms) | torch, seed mask_mod (ms) | "
            "speedup | torch, seg-id mask_mod (ms) | speedup | torch reps |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        sp_seed = f"{r['seed_ms'] / r['segflex_ms']:.0f}x" if r["seed_ms"] else "-"
        sp_seg = f"{r['segid_ms'] / r['segflex_ms']:.0f}x" if r["segid_ms"] else "-"
        seed = fmt_ms(r["seed_ms"]) + ("" if r["seed_ms"] else f" ({r['seed_skip']})")
        segid = fmt_ms(r["segid_ms"]) + ("" if r["segid_ms"] else f" ({r['segid_skip']})")
        lines.append(f"| {r['config']} | {r['tokens']} | {fmt_ms(r['segflex_ms'])} | "
                     f"{fmt_ms(r['segflex_min_ms'])} | {fmt_ms(r['segflex_1t_ms'])} | {fmt_ms(r['segflex_flex_ms'])} | {seed} | {sp_seed} | {segid} | {sp_seg} | "
                     f"{r['torch_repeats']} |")
    mismatches = [r["config"] for r in rows
                  if r.get("seed_same") is False or r.get("segid_same") is False]
    lines.append("")
    lines.append("block masks identical to create_block_mask's: "
                 + ("yes, every measured row" if not mismatches else f"NO for {mismatches}"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed runs of the segflex builder")
    ap.add_argument("--torch-repeats", type=int, default=3, help="timed runs of create_block_mask")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                    help="torch's intra-op threads (OMP_NUM_THREADS sets segflex's OpenMP threads)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, block {BLOCK}, median of repeats after one warm-up; "
          "speedups are torch median / segflex median")
    print(table(run(args.repeats, args.torch_repeats)))


if __name__ == "__main__":
    main()

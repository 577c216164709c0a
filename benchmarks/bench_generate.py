"""Self-ensemble generation speed: the earlier method, the best stock recipe, segflex.

One question = N paraphrases of P tokens each, every paraphrase an isolated
segment (the earlier system's layout), followed by G generated tokens (greedy,
no early stop, so every method does the same work). Model: random weights of
Llama-3.2-3B's shape (28 layers, hidden 3072, 24/8 heads of 128, vocab 128256)
in bf16 on CUDA; ``--small`` gives a tiny fp32 shape that runs on a CPU.

Methods (all through the same transformers model, only attention differs):

* ``seed-flex-eager``  the earlier method: at every generated token, build the
  block mask again (``create_block_mask`` on the segment ``mask_mod``) and run
  the whole sequence again, with uncompiled ``flex_attention``.
* ``seed-flex-compiled``  the same with ``torch.compile``-d ``flex_attention``.
* ``stock-best``  one compiled-flex prefill with the block mask, then decode
  with PyTorch SDPA over transformers' KV cache (generated tokens see all keys).
* ``segflex``  segflex.generate: one segflex prefill, decode with segflex.decode
  over segflex's static per-row cache, each decode step replayed from a CUDA graph
  (``segflex-no-graphs``: the same, launched eagerly from Python).

Every question of a batch has its own random tokens (same lengths).

Batches: the seed methods at batch 1, stock-best and segflex at every
``--batches`` size (every question has the same length, so stock-best batches
without padding). Output: ONE table with ms per question, ms per generated
token (of one question) and questions per second, plus how many of each method's
tokens (question 0) equal segflex's at batch 1. ``segflex-prefill-only`` generates one
token (the prefill's), so the decode steps cost the difference. With random bf16
weights the logits are nearly flat, so rounding differences between methods (or batch
sizes) flip near-ties: agreement there is a sanity check, not a correctness test (the
tests compare against references).

    python benchmarks/bench_generate.py            # GPU, Llama-3.2-3B shape
    python benchmarks/bench_generate.py --small    # CPU-sized check
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import segflex
import segflex.hf  # noqa: F401  (registers "segflex")
from segflex.hf import cache_keyword
from segflex.generate import Row, generate_rows


def build_model(small: bool, device: str, dtype: torch.dtype, layers: int | None):
    import transformers

    if small:
        shape = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024)
    else:
        shape = dict(num_hidden_layers=28, hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0)
    if layers:
        shape["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=True,
                                      initializer_range=0.02 if not small else 0.2)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
        except TypeError:  # transformers 4.x spelling
            model = transformers.LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    return model.eval()


# ------------------------------------------------------------ stock attention


def _flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    block_mask=None, flex_fn=None, **kwargs):
    """Attention for the stock methods: flex with the given block mask, or
    (decode, no block mask) SDPA over the whole cache."""
    if block_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
    else:
        out = flex_fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register_stock() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("bench_stock", _flex_attention)
    # no transformers-built masks: the block mask travels as a keyword
    AttentionMaskInterface.register("bench_stock", lambda *args, **kwargs: None)


def segment_mask_mod(layout: segflex.SegmentLayout, device) -> Callable:
    """The segment mask as a FlexAttention mask_mod (positions past the layout are global)."""
    seg = torch.tensor(layout.segment_ids(), device=device, dtype=torch.int32)
    kinds = torch.tensor([segflex.KINDS.index(k) for k in layout.kinds], device=device)
    n = len(layout)
    tail = 10_000  # room for generated tokens: global, own segment id

    seg = torch.cat([seg, torch.full((tail,), layout.n_segments, device=device, dtype=torch.int32)])
    kind = torch.cat([kinds[seg[:n]], torch.full((tail,), 2, device=device, dtype=kinds.dtype)])

    def mask_mod(b, h, q, k):
        return (k <= q) & ((kind[q] == 2) | (seg[q] == seg[k]) | (kind[k] == 0))

    return mask_mod


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def seed_method(model, layout, tokens, positions, new_tokens, flex_fn, device) -> list[int]:
    """Rebuild the block mask and run the whole sequence at every token (batch 1)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = segment_mask_mod(layout, device)
    seq, pos = list(tokens), list(positions)
    out = []
    for _ in range(new_tokens):
        n = len(seq)
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=device)
        logits = model(torch.tensor([seq], device=device), position_ids=torch.tensor([pos], device=device),
                       block_mask=block_mask, flex_fn=flex_fn, use_cache=False, logits_to_keep=1).logits
        t = int(logits[0, -1].argmax())
        out.append(t)
        seq.append(t)
        pos.append(pos[-1] + 1)
    return out


@torch.no_grad()
def stock_best(model, layout, questions, positions, batch, new_tokens, flex_fn, device) -> list[list[int]]:
    """Compiled-flex prefill of the batch, then SDPA decode over transformers' cache."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = len(questions[0])
    block_mask = create_block_mask(segment_mask_mod(layout, device), None, None, n, n, device=device)
    ids = torch.tensor(questions[:batch], device=device)
    pos = torch.tensor([list(positions)] * batch, device=device)
    res = model(ids, position_ids=pos, block_mask=block_mask, flex_fn=flex_fn, use_cache=True, logits_to_keep=1)
    cache = res.cache if hasattr(res, "cache") else res.past_key_values
    token = res.logits[:, -1].argmax(-1)
    out = [token]
    nxt = pos[:, -1:] + 1
    for step in range(new_tokens - 1):
        res = model(token[:, None], position_ids=nxt + step, **{cache_keyword(model): cache}, use_cache=True,
                    logits_to_keep=1)
        token = res.logits[:, -1].argmax(-1)
        out.append(token)
    return torch.stack(out, 1).tolist()


@torch.no_grad()
def segflex_method(model, layout, questions, positions, batch, new_tokens, graphs=None) -> list[list[int]]:
    rows = [Row(list(tokens), layout, positions) for tokens in questions[:batch]]
    return [g.tokens for g in generate_rows(model, None, rows, max_new_tokens=new_tokens, stop=False,
                                            cuda_graphs=graphs)]


def timed(fn, device: str, repeats: int):
    """Median wall time of ``repeats`` runs after one warm-up run (compilation)."""
    result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return result, times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny fp32 model and short prompts (CPU)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--paraphrases", type=int, default=5)
    ap.add_argument("--para-len", type=int, default=None, help="tokens per paraphrase (400; --small 48)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default=None, help="comma list (1,8,32,64; --small 1,2,4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of methods to skip, e.g. seed-flex-eager")
    ap.add_argument("--seed-compile", choices=["auto", "dynamic", "static"], default="auto",
                    help="how seed-flex-compiled compiles the growing lengths (auto: dynamic on CUDA)")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.small or device == "cpu" else torch.bfloat16
    para_len = args.para_len or (48 if args.small else 400)
    batches = [int(b) for b in (args.batches or ("1,2,4" if args.small else "1,8,32,64")).split(",")]
    skip = set(filter(None, args.skip.split(",")))
    G = args.new_tokens

    from torch.nn.attention.flex_attention import flex_attention

    flex_compiled = torch.compile(flex_attention, dynamic=False)  # fixed shapes per batch size
    # The seed's sequence grows every step: one dynamic-shape compile on CUDA; on CPU
    # (where inductor's dynamic flex kernel does not build) one static compile per
    # length, all done in the warm-up run.
    seed_dynamic = args.seed_compile == "dynamic" or (args.seed_compile == "auto" and device != "cpu")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * G)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 16 * G)
    flex_seed = torch.compile(flex_attention, dynamic=seed_dynamic)
    register_stock()
    model = build_model(args.small, device, dtype, args.layers)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    # distinct questions of equal length (no padding for the stock method, no prefix shared
    # across a batch that segflex could encode once)
    questions = torch.randint(3, vocab, (max(batches), args.paraphrases * para_len), generator=g).tolist()
    tokens = questions[0]
    layout = segflex.SegmentLayout([para_len] * args.paraphrases, ["isolated"] * args.paraphrases)
    positions = layout.position_ids("contiguous")

    rows = []  # (method, batch, seconds, tokens of row 0)

    def run(name, batch, fn, impl):
        if name in skip:
            return
        model.set_attn_implementation(impl)
        try:
            toks, sec = timed(fn, device, args.repeats)
        except Exception as exc:  # report and go on: one table even when a method fails
            print(f"# {name} batch {batch}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return
        rows.append((name, batch, sec, toks[0] if isinstance(toks[0], list) else toks))
        print(f"# {name} batch {batch}: {sec * 1000 / batch:.2f} ms/question", file=sys.stderr, flush=True)

    run("seed-flex-eager", 1, lambda: seed_method(model, layout, tokens, positions, G, flex_attention, device),
        "bench_stock")
    run("seed-flex-compiled", 1,
        lambda: seed_method(model, layout, tokens, positions, G, flex_seed, device), "bench_stock")
    for b in batches:
        run("stock-best", b, lambda: stock_best(model, layout, questions, positions, b, G, flex_compiled,
                                                device), "bench_stock")
        if device != "cpu":
            run("segflex-no-graphs", b,
                lambda: segflex_method(model, layout, questions, positions, b, G, graphs=False), "segflex")
        run("segflex", b, lambda: segflex_method(model, layout, questions, positions, b, G), "segflex")
        run("segflex-prefill-only", b,
            lambda: segflex_method(model, layout, questions, positions, b, 1), "segflex")

    ref = next((r[3] for r in rows if r[0] == "segflex" and r[1] == 1), None)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"# model {'small' if args.small else 'Llama-3.2-3B shape'} ({model.config.num_hidden_layers} layers, "
          f"hidden {model.config.hidden_size}, {dtype}), {name}, torch {torch.__version__}")
    print(f"# question: {args.paraphrases} paraphrases x {para_len} tokens (isolated), {G} new tokens, greedy; "
          f"median of {args.repeats} after a warm-up")
    print(f"{'method':<20}{'batch':>6}{'ms/question':>14}{'ms/token':>11}{'questions/s':>13}  tokens as segflex b=1")
    for method, batch, sec, toks in rows:
        per_q = sec * 1000 / batch
        same = sum(a == b for a, b in zip(toks, ref or []))
        agree = "-" if ref is None else f"{same}/{len(toks)}"
        print(f"{method:<20}{batch:>6}{per_q:>14.2f}{per_q / G:>11.3f}{batch / sec:>13.2f}  {agree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The generation engine and every method against slow references written here.

The reference is the earlier system's method: the whole sequence is run
again at every new token (no KV cache) with eager attention and a dense
additive 4D mask built here from the mask formula (DESIGN section 1) and the
segment boundaries computed here from the token lists; position ids likewise.
Logit-fusion baselines are checked against the same uncached loop applied to
their formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from segflex.generate import (  # noqa: E402
    Question,
    default_normalize,
    encode_question,
    generate,
    generate_rows,
    partial_match,
    run_method,
    self_consistency,
    self_ensemble_row,
)
from test_hf import aligned_positions, formula_mask  # noqa: E402
from tiny_models import random_questions, tiny_model, tiny_tokenizer  # noqa: E402

MAX_NEW = 8
N_QUESTIONS = 50


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, seed=7)


@pytest.fixture(scope="module")
def questions(tok):
    return random_questions(N_QUESTIONS, seed=11, tokenizer=tok)


# ------------------------------------------------------------- the reference


def stop_ids(tok):
    return {i for i in range(len(tok)) if "\n" in tok.decode([i])} | {tok.eos_token_id}


def reference_segments(q: Question, fmt: str, bias: float, separator=()):
    """(token list, segment lengths, kinds, biases) of the self-ensemble sequence."""
    if fmt == "shared":
        pieces = [(list(q.bos + q.prefix), "shared", 0.0)]
        pieces += [(list(p), "isolated", bias) for p in q.paraphrases]
        pieces += [(list(q.answer_cue), "global", 0.0)]
    else:
        pieces = [(list(q.bos), "shared", 0.0)]
        for i, p in enumerate(q.paraphrases):
            sep = list(separator) if i < q.n - 1 else []
            pieces.append((list(q.prefix + p + q.answer_cue) + sep, "isolated", bias))
    pieces = [x for x in pieces if x[0]]
    tokens = [t for ids, _, _ in pieces for t in ids]
    return tokens, [len(ids) for ids, _, _ in pieces], [k for _, k, _ in pieces], [b for _, _, b in pieces]


@torch.no_grad()
def reference_greedy(model, tok, tokens, lengths=None, kinds=None, biases=None, mode="contiguous",
                     max_new=MAX_NEW, combine=None):
    """Full recompute at every step, eager attention, dense 4D mask from the formula.

    ``tokens`` is one prompt, or with ``combine`` a list of prompts whose float64
    logits are fused by ``combine(list_of_logit_vectors)``.
    """
    model.set_attn_implementation("eager")
    stops = stop_ids(tok)
    prompts = [tokens] if combine is None else tokens
    generated = []
    for _ in range(max_new):
        logits = []
        for prompt in prompts:
            seq = list(prompt) + generated
            ids = torch.tensor([seq])
            if lengths is None:  # plain causal prompt
                out = model(ids).logits[0, -1]
            else:
                n_prompt = sum(lengths)
                base = list(range(n_prompt)) if mode == "contiguous" else aligned_positions(lengths, kinds)
                pos = base + [base[-1] + 1 + i for i in range(len(generated))]
                mask = formula_mask(lengths, kinds, biases, len(seq)).float()[None, None]
                out = model(ids, position_ids=torch.tensor([pos]), attention_mask=mask).logits[0, -1]
            logits.append(out.double())
        token = int(torch.argmax(logits[0] if combine is None else combine(logits)))
        generated.append(token)
        if token in stops:
            break
    return generated


# ---------------------------------------------------------------- self-ensemble


@pytest.mark.parametrize("fmt", ["shared", "seed"])
@pytest.mark.parametrize("mode", ["contiguous", "aligned"])
@pytest.mark.parametrize("bias", ["zero", "-log_n"])
def test_self_ensemble_equals_full_recompute_reference(model, tok, questions, fmt, mode, bias):
    sep = tok("\n\n[SEP]\n\n", add_special_tokens=False)["input_ids"] if fmt == "seed" else []
    kw = dict(format=fmt, positions=mode, paraphrase_bias=0.0 if bias == "zero" else "-log_n",
              separator=sep, max_new_tokens=MAX_NEW, batch_size=16)
    got = generate(model, tok, questions, **kw)
    assert model.config._attn_implementation == "eager"  # restored after generation
    for q, g in zip(questions, got):
        b = 0.0 if bias == "zero" else -math.log(q.n)
        tokens, lengths, kinds, biases = reference_segments(q, fmt, b, sep)
        assert self_ensemble_row(q, fmt, mode, kw["paraphrase_bias"], sep).tokens == tokens
        ref = reference_greedy(model, tok, tokens, lengths, kinds, biases, mode)
        assert g[0].tokens == ref
        text = tok.decode([t for t in ref if t != tok.eos_token_id], skip_special_tokens=True)
        assert g[0].generation == text
        assert g[0].prediction == text.strip().split("\n")[0].strip()


def test_batch_of_16_equals_one_at_a_time(model, tok, questions):
    batch = questions[:16]
    for fmt in ("shared", "seed"):
        together = generate(model, tok, batch, format=fmt, max_new_tokens=MAX_NEW, batch_size=16)
        alone = [generate(model, tok, [q], format=fmt, max_new_tokens=MAX_NEW)[0] for q in batch]
        assert [g[0].tokens for g in together] == [g[0].tokens for g in alone]


def test_bias_and_positions_matter(model, tok, questions):
    """Guard against options being ignored: they change some generations."""
    qs = [q for q in questions if q.n >= 3][:12]
    a = generate(model, tok, qs, paraphrase_bias=0.0, positions="contiguous")
    b = generate(model, tok, qs, paraphrase_bias="-log_n", positions="contiguous")
    c = generate(model, tok, qs, paraphrase_bias=0.0, positions="aligned")
    assert [x[0].tokens for x in a] != [x[0].tokens for x in b]
    assert [x[0].tokens for x in a] != [x[0].tokens for x in c]


def test_other_architectures(tok):
    qs = random_questions(6, seed=5, tokenizer=tok)
    for arch in ("qwen2", "mistral"):
        m = tiny_model(arch, layers=2, seed=3)
        got = generate(m, tok, qs, format="shared", positions="aligned", max_new_tokens=6)
        for q, g in zip(qs, got):
            tokens, lengths, kinds, biases = reference_segments(q, "shared", -math.log(q.n))
            assert g[0].tokens == reference_greedy(m, tok, tokens, lengths, kinds, biases, "aligned", 6)


def test_generated_tokens_stop_on_their_own(model, tok, questions):
    """Each sequence stops at its first stop token, whatever the others do."""
    got = generate(model, tok, questions[:16], max_new_tokens=12)
    stops = stop_ids(tok)
    lengths = set()
    for g in got:
        toks = g[0].tokens
        assert all(t not in stops for t in toks[:-1])
        assert len(toks) == 12 or toks[-1] in stops
        lengths.add(len(toks))
    assert len(lengths) > 1  # the batch really had sequences stopping at different steps


# ---------------------------------------------------------------- baselines


def test_origin_and_per_prompt(model, tok, questions):
    qs = questions[:10]
    origin = run_method(model, tok, qs, "origin", max_new_tokens=MAX_NEW, batch_size=8)
    per = run_method(model, tok, qs, "per_prompt", max_new_tokens=MAX_NEW, batch_size=8)
    for q, o, p in zip(qs, origin, per):
        refs = [reference_greedy(model, tok, list(q.bos + q.prefix + para + q.answer_cue))
                for para in q.paraphrases]
        assert len(o) == 1 and o[0].tokens == refs[0]
        assert [g.tokens for g in p] == refs


def _fusion(kind, weights=None):
    def avg(ls):
        return torch.stack(ls).mean(0)

    def mx(ls):
        return torch.stack([torch.softmax(x, -1) for x in ls]).max(0).values

    def wavg(ls):
        return sum(w * x for w, x in zip(weights, ls))

    return {"avg": avg, "max": mx, "weighted_avg": wavg}[kind]


@pytest.mark.parametrize("method", ["avg", "max", "weighted_avg"])
def test_logit_fusion_equals_uncached_formula(model, tok, questions, method):
    qs = questions[:8]
    rng = np.random.default_rng(0)
    conf = [list(rng.uniform(0, 1, q.n)) for q in qs]
    got = run_method(model, tok, qs, method, confidences=conf, max_new_tokens=MAX_NEW, batch_size=5)
    for q, c, g in zip(qs, conf, got):
        w = [x / sum(c) for x in c]
        prompts = [list(q.bos + q.prefix + p + q.answer_cue) for p in q.paraphrases]
        assert g[0].tokens == reference_greedy(model, tok, prompts, combine=_fusion(method, w))


def test_fusion_methods_differ_from_origin(model, tok, questions):
    qs = [q for q in questions if q.n >= 3][:12]
    origin = [g[0].tokens for g in run_method(model, tok, qs, "origin", max_new_tokens=MAX_NEW)]
    avg = [g[0].tokens for g in run_method(model, tok, qs, "avg", max_new_tokens=MAX_NEW)]
    assert origin != avg


def test_weighted_max_is_most_confident_paraphrase_alone(model, tok, questions):
    qs = questions[:6]
    conf = [[(i * 7 + j * 3) % 5 / 4 for j in range(q.n)] for i, q in enumerate(qs)]
    got = run_method(model, tok, qs, "weighted_max", confidences=conf, max_new_tokens=MAX_NEW)
    for q, c, g in zip(qs, conf, got):
        best = int(np.argmax(c))
        assert g[0].tokens == reference_greedy(model, tok, q.prompt(best))


def test_all_zero_confidences_give_equal_weights(model, tok, questions):
    qs = questions[:4]
    with pytest.warns(UserWarning, match="all confidences are zero"):
        got = run_method(model, tok, qs, "weighted_avg", confidences=[[0.0] * q.n for q in qs],
                         max_new_tokens=MAX_NEW)
    for q, g in zip(qs, got):
        prompts = [q.prompt(i) for i in range(q.n)]
        assert g[0].tokens == reference_greedy(model, tok, prompts, combine=_fusion("avg"))


def test_confidence_length_checked(model, tok, questions):
    with pytest.raises(ValueError, match="confidences"):
        run_method(model, tok, questions[:2], "weighted_avg", confidences=[[1.0]])


# ---------------------------------------------------------------- sampling


def test_tiny_top_p_sampling_is_greedy(model, tok, questions):
    """top_p -> 0 keeps only the top token: every sample equals the greedy answer,
    through the shared prefill and the repeated cache rows."""
    qs = questions[:4]
    greedy = generate(model, tok, qs, max_new_tokens=MAX_NEW)
    sampled = generate(model, tok, qs, max_new_tokens=MAX_NEW, temperature=1.5, top_p=1e-9,
                       num_samples=5, seed=3)
    for g, s in zip(greedy, sampled):
        assert len(s) == 5 and all(x.tokens == g[0].tokens for x in s)


def test_sampling_follows_the_softmax(model, tok, questions):
    """First sampled token of one prompt against softmax(logits / T) of the
    reference forward: every token's count within 5 standard deviations of its
    expectation, and every token of probability >= 1% sampled."""
    q = questions[0]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        logits = model(torch.tensor([q.prompt(0)])).logits[0, -1].double()
    temperature = 0.7
    probs = torch.softmax(logits / temperature, -1).numpy()
    row = self_ensemble_row(Question(q.prefix, q.paraphrases[:1], q.answer_cue, q.bos), "shared",
                            "contiguous", 0.0)
    n = 4000
    gen = torch.Generator().manual_seed(0)
    out = generate_rows(model, tok, [row], max_new_tokens=1, temperature=temperature,
                        num_samples=n, generator=gen)
    counts = np.bincount([g.tokens[0] for g in out], minlength=len(probs))
    # tokens of probability < 0.5% are pooled into one bin (their counts are too small for z)
    big = probs >= 0.005
    p_bins = np.append(probs[big], probs[~big].sum())
    c_bins = np.append(counts[big], counts[~big].sum())
    z = np.abs(c_bins - n * p_bins) / np.sqrt(n * p_bins * (1 - p_bins))
    assert z.max() < 5, (z.max(), p_bins)
    assert (counts[probs >= 0.01] > 0).all()
    assert (probs >= 0.01).sum() >= 3  # the test is not vacuous (several likely tokens)


def test_sampling_is_reproducible_with_a_seed(model, tok, questions):
    a = generate(model, tok, questions[:3], temperature=1.0, num_samples=4, seed=5)
    b = generate(model, tok, questions[:3], temperature=1.0, num_samples=4, seed=5)
    assert [[x.tokens for x in g] for g in a] == [[x.tokens for x in g] for g in b]


# ---------------------------------------------------------- self-consistency


def test_partial_match():
    assert partial_match(["new", "york"], ["new", "york", "city"])
    assert partial_match(["new", "york", "city"], ["york"])
    assert not partial_match(["new", "york"], ["york", "new"])
    assert partial_match([], [])
    assert not partial_match([], ["paris"])
    assert default_normalize("  The  Nile ") == ["the", "nile"]


def test_self_consistency_with_deterministic_samples(model, tok, questions):
    qs = questions[:3]
    recs = self_consistency(model, tok, qs, num_samples=4, temperature=1.0, top_p=1e-9,
                            max_new_tokens=MAX_NEW)
    per = run_method(model, tok, qs, "per_prompt", max_new_tokens=MAX_NEW)
    for q, rs, p in zip(qs, recs, per):
        assert len(rs) == q.n
        for r, g in zip(rs, p):
            assert r.greedy == g.prediction and r.samples == [g.prediction] * 4
            assert r.confidence == 1.0


def test_self_consistency_counts_matches(model, tok, questions):
    """With real sampling, the confidence is the fraction of matching samples
    (recounted here with an independent normaliser)."""
    qs = questions[:2]
    recs = self_consistency(model, tok, qs, num_samples=20, temperature=1.0, max_new_tokens=4,
                            normalize=lambda s: [w for w in s.lower().split() if w])
    for rs in recs:
        for r in rs:
            g = r.greedy.lower().split()
            n = sum(partial_match(g, s.lower().split()) for s in r.samples)
            assert r.confidence == n / 20 and len(r.samples) == 20


# ---------------------------------------------------------------- inputs


def test_encode_question_tokenises_pieces_and_puts_bos_once(tok):
    q = encode_question(tok, "Instr.\n\nQ: ", ["What is it?", "Which one?"], "\nA:")
    assert q.bos == (tok.bos_token_id,)
    assert tok.bos_token_id not in q.prefix + q.answer_cue + sum(q.paraphrases, ())
    assert tok.decode(q.prompt(0), skip_special_tokens=True) == "Instr.\n\nQ: What is it?\nA:"
    row = self_ensemble_row(q, "shared", "contiguous", 0.0)
    assert row.tokens.count(tok.bos_token_id) == 1 and row.tokens[0] == tok.bos_token_id


def test_argument_errors(model, tok, questions):
    with pytest.raises(ValueError, match="method"):
        run_method(model, tok, questions[:1], "nope")
    with pytest.raises(ValueError, match="format"):
        generate(model, tok, questions[:1], format="nope")
    with pytest.raises(ValueError, match="positions"):
        generate(model, tok, questions[:1], positions="nope")
    with pytest.raises(ValueError, match="paraphrases"):
        Question((1,), (), ())
    with pytest.raises(TypeError, match="paraphrases"):
        encode_question(tok, "x", "a string", "\nA:")


def test_top_p_keeps_the_smallest_set_reaching_p():
    from segflex.generate import _choose

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    scores = probs.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    for top_p, allowed in [(0.79, {0, 1}), (0.85, {0, 1, 2}), (0.4, {0}), (1.0, {0, 1, 2, 3})]:
        seen = set(_choose(scores, 1.0, top_p, gen).tolist())
        assert seen == allowed, (top_p, seen)


def test_shared_prefix_is_encoded_once_and_changes_nothing(model, tok, questions, monkeypatch):
    """Rows with a common prefix: the engine encodes it once (prompt caching) and the result
    is still the full-recompute reference's, for plain rows and self-ensemble rows alike."""
    import segflex.generate as engine

    seen = []
    real = engine._shared_prefix
    monkeypatch.setattr(engine, "MIN_SHARED_PREFIX", 1)
    monkeypatch.setattr(engine, "_shared_prefix", lambda rows: seen.append(real(rows)) or seen[-1])
    long_prefix = tok("The following questions are about general knowledge. " * 3,
                      add_special_tokens=False)["input_ids"]
    qs = [Question(tuple(long_prefix) + q.prefix, q.paraphrases, q.answer_cue, q.bos)
          for q in questions[:6]]
    per = run_method(model, tok, qs, "per_prompt", max_new_tokens=MAX_NEW, batch_size=6)
    assert seen and min(seen) >= len(long_prefix)  # the prefix path really ran
    for q, p in zip(qs, per):
        refs = [reference_greedy(model, tok, list(q.bos + q.prefix + para + q.answer_cue))
                for para in q.paraphrases]
        assert [g.tokens for g in p] == refs
    seen.clear()
    got = generate(model, tok, qs, format="shared", positions="aligned", max_new_tokens=MAX_NEW,
                   batch_size=6)
    assert seen and min(seen) >= len(long_prefix)
    for q, g in zip(qs, got):
        tokens, lengths, kinds, biases = reference_segments(q, "shared", -math.log(q.n))
        assert g[0].tokens == reference_greedy(model, tok, tokens, lengths, kinds, biases, "aligned")


def test_finished_rows_leave_the_batch_without_changing_results(model, tok, questions, monkeypatch):
    """With many stop tokens, rows finish at different steps and the engine shrinks the batch;
    every method still equals its full-recompute reference under the same stop rule."""
    import sys

    import segflex.generate as engine
    import segflex.hf as hf

    _, eos = engine._stop_ids(tok, model, len(tok))
    many = {i for i in range(len(tok)) if i % 4 == 0} | set(eos)
    monkeypatch.setattr(engine, "_stop_ids", lambda *a: (many, eos))
    monkeypatch.setattr(sys.modules[__name__], "stop_ids", lambda tok: many)
    shrinks = []
    real = hf.SegmentCache.select_rows
    monkeypatch.setattr(hf.SegmentCache, "select_rows",
                        lambda self, idx: shrinks.append(len(idx)) or real(self, idx))
    qs = questions[:12]
    per = run_method(model, tok, qs, "per_prompt", max_new_tokens=MAX_NEW, batch_size=12)
    se = generate(model, tok, qs, format="shared", positions="contiguous", max_new_tokens=MAX_NEW,
                  batch_size=12)
    conf = [[1.0] * q.n for q in qs]
    fused = run_method(model, tok, qs, "avg", confidences=conf, max_new_tokens=MAX_NEW, batch_size=12)
    assert shrinks, "no row finished early: the test does not exercise the shrinking batch"
    for q, p, s, f in zip(qs, per, se, fused):
        prompts = [list(q.bos + q.prefix + para + q.answer_cue) for para in q.paraphrases]
        assert [g.tokens for g in p] == [reference_greedy(model, tok, x) for x in prompts]
        tokens, lengths, kinds, biases = reference_segments(q, "shared", -math.log(q.n))
        assert s[0].tokens == reference_greedy(model, tok, tokens, lengths, kinds, biases)
        assert f[0].tokens == reference_greedy(model, tok, prompts, combine=_fusion("avg"))


def test_cuda_graphs_refused_for_cpu_models(model, tok, questions):
    row = self_ensemble_row(questions[0])
    with pytest.raises(ValueError, match="cuda_graphs"):
        generate_rows(model, tok, [row], max_new_tokens=2, cuda_graphs=True)


def test_cache_fill_from_equals_repeat_rows():
    from segflex.hf import SegmentCache

    src = SegmentCache(2, 10)
    src.begin_prefill(torch.tensor([4, 6]))
    for layer in range(2):
        src.update(torch.randn(2, 3, 6, 5), torch.randn(2, 3, 6, 5), layer)
    src.advance()
    dst = SegmentCache(2, 16)
    dst.fill_from(src, 3)
    src.repeat_rows(3)
    assert torch.equal(dst.lens, src.lens)
    for layer in range(2):
        assert torch.equal(dst.keys[layer][:, :, :10], src.keys[layer])
        assert torch.equal(dst.values[layer][:, :, :10], src.values[layer])

"""The generator and the transformers integration on a CUDA device, in half precision.

Reference: the same random tiny model in float32 on the GPU with eager attention and a
dense additive mask from the formula (test_hf.formula_mask), run over prompt + generated
tokens in one forward (teacher forcing: the logits of every step at once). segflex runs
the model in float16, so its greedy choice may differ from the float32 argmax only where
the float32 logits are nearly tied: every chosen token must be within TOL of the reference
maximum, and nearly all must be the reference argmax itself.
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
segflex = pytest.importorskip("segflex")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not segflex.cuda_available(), reason="segflex built without CUDA"),
]

from segflex import generate as sg  # noqa: E402
from segflex import graphs  # noqa: E402
from test_generate import reference_segments  # noqa: E402
from test_hf import aligned_positions, formula_mask  # noqa: E402
from tiny_models import random_questions, tiny_model, tiny_tokenizer  # noqa: E402

TOL = 0.15         # logits of this tiny model span about +-8; fp16 moves them by about 0.05
MIN_EXACT = 0.85   # fraction of steps where segflex picks the float32 argmax itself
MAX_NEW = 8


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    ref = tiny_model("llama", layers=2, seed=7, head_dim=64).to("cuda")
    ref.set_attn_implementation("eager")
    half = copy.deepcopy(ref).to(torch.float16)
    return ref, half


@pytest.fixture(scope="module")
def questions(tok):
    return random_questions(24, seed=5, tokenizer=tok)


@torch.no_grad()
def step_logits(ref, tokens, lengths, kinds, biases, mode, generated):
    """float64 reference logits predicting each generated token (teacher forced)."""
    seq = list(tokens) + list(generated)
    n = len(tokens)
    base = list(range(n)) if mode == "contiguous" else aligned_positions(lengths, kinds)
    pos = base + [base[-1] + 1 + i for i in range(len(generated))]
    mask = formula_mask(lengths, kinds, biases, len(seq)).float()[None, None].cuda()
    out = ref(torch.tensor([seq], device="cuda"), position_ids=torch.tensor([pos], device="cuda"),
              attention_mask=mask).logits[0].double()
    return out[n - 1 : n - 1 + len(generated)]


class Agreement:
    """Checks each chosen token against reference logits; counts exact argmax matches."""

    def __init__(self):
        self.steps = self.exact = 0

    def check(self, logits, chosen, what):
        assert len(chosen) > 0, what
        for t, token in enumerate(chosen):
            row = logits[t]
            gap = float(row.max() - row[token])
            assert gap <= TOL, f"{what}: step {t} picked a token {gap:.3f} below the best"
            self.steps += 1
            self.exact += int(int(row.argmax()) == token)

    def done(self):
        assert self.steps > 0
        assert self.exact / self.steps >= MIN_EXACT, f"{self.exact}/{self.steps} exact"


@pytest.mark.parametrize("fmt", ["shared", "seed"])
@pytest.mark.parametrize("mode", ["contiguous", "aligned"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_self_ensemble_matches_float32_reference(models, tok, questions, fmt, mode, cuda_graphs,
                                                 monkeypatch):
    ref, half = models
    monkeypatch.setattr(sg, "CUDA_GRAPHS", cuda_graphs)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"] if fmt == "seed" else []
    got = sg.generate(half, tok, questions, format=fmt, positions=mode, separator=sep,
                      max_new_tokens=MAX_NEW, batch_size=8)
    agree = Agreement()
    for q, g in zip(questions, got):
        tokens, lengths, kinds, biases = reference_segments(q, fmt, -math.log(q.n), sep)
        agree.check(step_logits(ref, tokens, lengths, kinds, biases, mode, g[0].tokens),
                    g[0].tokens, f"question of {q.n} paraphrases")
    agree.done()


def test_graphed_decoder_is_reused_and_equals_eager(models, tok, questions, monkeypatch):
    _, half = models
    graphs.release(half)
    rows = [sg.self_ensemble_row(q) for q in questions[:16]]
    first, second = rows[:8], rows[8:]
    eager = [g.tokens for g in sg.generate_rows(half, None, second, max_new_tokens=MAX_NEW,
                                                stop=False, cuda_graphs=False)]
    sg.generate_rows(half, None, first, max_new_tokens=MAX_NEW, stop=False, cuda_graphs=True)
    store = half.__dict__[graphs._ATTR]
    (decoder,) = store.values()
    graph = decoder.graph
    again = [g.tokens for g in sg.generate_rows(half, None, second, max_new_tokens=MAX_NEW,
                                                stop=False, cuda_graphs=True)]
    assert len(store) == 1 and decoder.graph is graph  # replayed, not captured again
    same = sum(a == b for x, y in zip(eager, again) for a, b in zip(x, y))
    assert same >= MIN_EXACT * len(eager) * MAX_NEW, (eager, again)


def test_samples_share_one_prefill_under_graphs(models, tok, questions):
    """Temperature 0 with several samples: the samples of a row share its prefill and each
    is the greedy continuation. The samples decode as one batch of 12 rows and the greedy
    run as one of 4; split-KV choices follow the batch, so their fp16 rounding differs and
    a nearly tied step may pick differently later on. So: a row's samples (one prefill,
    decoded side by side) are identical, their first token (from the shared prefill) is
    the greedy one, and at least 3 of the 4 rows follow the greedy run to the end."""
    _, half = models
    rows = [sg.self_ensemble_row(q) for q in questions[:4]]
    greedy = sg.generate_rows(half, tok, rows, max_new_tokens=MAX_NEW, cuda_graphs=True)
    samples = sg.generate_rows(half, tok, rows, max_new_tokens=MAX_NEW, num_samples=3,
                               cuda_graphs=True)
    assert len(samples) == 3 * len(greedy)
    rows_equal = 0
    for r, g in enumerate(greedy):
        group = samples[3 * r : 3 * r + 3]
        for s in group:
            assert s.tokens == group[0].tokens
        assert group[0].tokens[:1] == g.tokens[:1]
        rows_equal += group[0].tokens == g.tokens
    assert rows_equal >= len(greedy) - 1, (greedy, samples)


@pytest.mark.parametrize("method", ["avg", "max", "per_prompt"])
def test_baselines_match_float32_reference(models, tok, questions, method):
    ref, half = models
    got = sg.run_method(half, tok, questions[:12], method, max_new_tokens=MAX_NEW, batch_size=4)
    agree = Agreement()
    for q, g in zip(questions[:12], got):
        prompts = [q.prompt(i) for i in range(q.n)]
        if method == "per_prompt":
            for p, gen in zip(prompts, g):
                logits = step_logits(ref, p, [len(p)], ["global"], [0.0], "contiguous", gen.tokens)
                agree.check(logits, gen.tokens, "per_prompt")
            continue
        chosen = g[0].tokens
        per = [step_logits(ref, p, [len(p)], ["global"], [0.0], "contiguous", chosen) for p in prompts]
        if method == "avg":
            fused = torch.stack(per).mean(0)
        else:
            fused = torch.stack([torch.softmax(x, -1) for x in per]).amax(0).log()
        agree.check(fused, chosen, method)
    agree.done()


def test_forward_with_layouts_matches_reference(models):
    ref, half = models
    layout = segflex.SegmentLayout([5, 7, 9, 3], ["shared", "isolated", "isolated", "global"],
                                   [0.0, -0.7, -0.7, 0.0])
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (1, len(layout)), device="cuda")
    pos = torch.tensor([layout.position_ids("aligned")], device="cuda")
    mask = formula_mask(layout.lengths, layout.kinds, layout.biases, len(layout)).float()
    want = ref(ids, position_ids=pos, attention_mask=mask[None, None].cuda()).logits.double()
    with segflex.hf.enable(half):
        got = half(ids, position_ids=pos, segment_layouts=[layout]).logits.double()
    err = (got - want).abs().max().item()
    assert err < TOL, err


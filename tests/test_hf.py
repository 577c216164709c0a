"""transformers integration: attn_implementation="segflex" against eager attention.

The reference is the model's own eager attention, fed a dense additive 4D mask
built here from the mask formula (DESIGN section 1), never from segflex.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import segflex  # noqa: E402
import segflex.hf  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

ARCHS = ["llama", "qwen2", "mistral"]


def formula_mask(lengths, kinds, biases, total):
    """Additive float mask [total, total]: 0 (+ key bias for global queries)
    where the formula allows, -inf elsewhere; positions past the layout form
    a global tail of bias 0. The formula is broadcast over all pairs."""
    seg = np.repeat(np.arange(len(lengths)), lengths)
    seg = np.concatenate([seg, np.full(total - len(seg), len(lengths))])
    kind = np.array(list(kinds) + ["global"])[seg]
    bias = np.array([float(b) for b in biases] + [0.0])[seg]
    q, k = np.arange(total)[:, None], np.arange(total)[None, :]
    is_global_q = (kind == "global")[:, None]
    allowed = (k <= q) & (is_global_q | (seg[None, :] == seg[:, None]) | (kind == "shared")[None, :])
    value = np.where(is_global_q, bias[None, :], 0.0)
    return torch.from_numpy(np.where(allowed, value, -np.inf))


def aligned_positions(lengths, kinds):
    out, pos, s = [], 0, 0
    while s < len(lengths):
        if kinds[s] == "isolated":
            e = s
            while e < len(lengths) and kinds[e] == "isolated":
                e += 1
            for t in range(s, e):
                out += list(range(pos, pos + lengths[t]))
            pos += max(lengths[s:e])
            s = e
        else:
            out += list(range(pos, pos + lengths[s]))
            pos += lengths[s]
            s += 1
    return out


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, layers=2, seed=1)


def _eager(model):
    model.set_attn_implementation("eager")
    return model


def test_registered_with_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "segflex" in AttentionInterface._global_mapping
    assert "segflex" in AttentionMaskInterface._global_mapping


def test_from_config_and_set_attn_implementation():
    m = tiny_model("llama", layers=1, attn="segflex")
    assert m.config._attn_implementation == "segflex"
    m.set_attn_implementation("eager")
    assert m.config._attn_implementation == "eager"
    m.set_attn_implementation("segflex")
    assert m.config._attn_implementation == "segflex"


def test_enable_switches_and_restores():
    m = tiny_model("llama", layers=1)
    assert m.config._attn_implementation == "eager"
    with segflex.hf.enable(m):
        assert m.config._attn_implementation == "segflex"
    assert m.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError):
        with segflex.hf.enable(m):
            raise RuntimeError("inside")
    assert m.config._attn_implementation == "eager"


@torch.no_grad()
def test_no_layouts_equals_eager(model):
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 37))
    ref = _eager(model)(ids).logits
    with segflex.hf.enable(model):
        got = model(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_right_padding_equals_eager_on_valid_tokens(model):
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (3, 25))
    lengths = [25, 11, 18]
    mask = torch.zeros(3, 25, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ref = _eager(model)(ids, attention_mask=mask).logits
    with segflex.hf.enable(model):
        got = model(ids, attention_mask=mask).logits
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, :n], ref[b, :n], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padding_raises(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with segflex.hf.enable(model), pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask)


@torch.no_grad()
def test_hf_generate_greedy_equals_eager(model):
    """transformers' own generate (DynamicCache): prefill + decode without layouts."""
    torch.manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = _eager(model).generate(ids, **kw)
    with segflex.hf.enable(model):
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("mode", ["contiguous", "aligned"])
@torch.no_grad()
def test_layouts_forward_equals_eager_with_formula_mask(model, mode):
    lengths_list = [[6, 4, 7, 5, 3], [3, 9, 2, 4], [5, 5, 5, 2]]
    kinds_list = [["shared", "isolated", "isolated", "isolated", "global"],
                  ["shared", "isolated", "isolated", "global"],
                  ["isolated", "isolated", "shared", "global"]]
    biases_list = [[0, -math.log(3)] * 2 + [0], [0, -0.7, -0.7, 0], [0.3, 0, 0, 0]]
    torch.manual_seed(3)
    total = max(sum(l) for l in lengths_list)
    ids = torch.randint(3, model.config.vocab_size, (3, total))
    layouts, positions = [], torch.zeros(3, total, dtype=torch.long)
    for b, (ls, ks, bs) in enumerate(zip(lengths_list, kinds_list, biases_list)):
        bs = [float(x) for x in bs][: len(ls)]
        layouts.append(segflex.SegmentLayout(ls, ks, bs))
        pos = list(range(sum(ls))) if mode == "contiguous" else aligned_positions(ls, ks)
        positions[b, : len(pos)] = torch.tensor(pos)
    with segflex.hf.enable(model):
        got = model(ids, position_ids=positions, segment_layouts=layouts).logits
    _eager(model)
    for b, lay in enumerate(layouts):
        n = len(lay)
        mask = formula_mask(lay.lengths, lay.kinds, lay.biases, n).float()[None, None]
        ref = model(ids[b : b + 1, :n], position_ids=positions[b : b + 1, :n], attention_mask=mask).logits
        torch.testing.assert_close(got[b, :n], ref[0], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_layouts_change_the_output(model):
    """The layout really reaches attention: isolating segments changes logits."""
    ids = torch.randint(3, model.config.vocab_size, (1, 20))
    lay = segflex.SegmentLayout([5, 5, 5, 5], ["shared", "isolated", "isolated", "global"])
    with segflex.hf.enable(model):
        plain = model(ids).logits
        masked = model(ids, segment_layouts=[lay]).logits
    assert torch.allclose(plain[0, :10], masked[0, :10], atol=1e-5)   # prefix and p1 see the same keys
    assert not torch.allclose(plain[0, 10:], masked[0, 10:], atol=1e-3)


def test_unsupported_cases_raise():
    m = tiny_model("llama", layers=1, attn="segflex")
    ids = torch.randint(3, m.config.vocab_size, (1, 12))
    with torch.no_grad(), pytest.raises(TypeError, match="dense"):
        m(ids, attention_mask=torch.zeros(1, 1, 12, 12))
    with torch.no_grad(), pytest.raises(ValueError, match="layouts for a batch"):
        m(ids, segment_layouts=[segflex.SegmentLayout([12], ["global"])] * 2)
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1
    m.train()
    with pytest.raises(ValueError, match="dropout"):
        m(ids)


def test_sliding_window_shorter_than_sequence_raises():
    m = tiny_model("mistral", layers=1)
    m.config.sliding_window = 8
    ids = torch.randint(3, m.config.vocab_size, (1, 20))
    with torch.no_grad(), segflex.hf.enable(m):
        with pytest.raises(ValueError, match="sliding window"):
            m(ids)
        with pytest.raises(ValueError, match="sliding window"):
            m(ids, segment_layouts=[segflex.SegmentLayout([10, 10], ["isolated", "global"])])
        m(ids[:, :8])  # within the window the mask is plain causal: allowed


def test_segment_cache_argument_checks():
    with pytest.raises(ValueError, match="num_layers"):
        segflex.hf.SegmentCache(0, 10)
    cache = segflex.hf.SegmentCache(2, 10)
    with pytest.raises(ValueError, match="empty"):
        cache.begin_decode()
    with pytest.raises(ValueError, match="max_len"):
        cache.begin_prefill(torch.tensor([11]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cache_keyword_reaches_the_layers(arch):
    """The keyword cache_keyword names is the one the installed transformers hands to its
    attention layers: a prefill through it fills every layer of a SegmentCache."""
    m = tiny_model(arch, attn="segflex")
    ids = torch.arange(1, 9)[None]
    cache = segflex.hf.SegmentCache(m.config.num_hidden_layers, 16)
    cache.begin_prefill(torch.tensor([8]))
    with torch.no_grad():
        m(ids, use_cache=True, **{segflex.hf.cache_keyword(m): cache})
    assert all(k is not None and k.shape[2] == 16 for k in cache.keys)
    assert torch.count_nonzero(cache.keys[-1][:, :, :8]) > 0
    assert torch.count_nonzero(cache.keys[-1][:, :, 8:]) == 0

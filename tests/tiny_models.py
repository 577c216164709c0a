"""Tiny random-initialised causal LMs and a tokenizer built offline, for tests.

The tokenizer is a byte-level BPE trained here on a few sentences (so it has
multi-byte merges, a BOS that ``add_special_tokens`` puts in front like Llama's,
an EOS, and tokens that contain newlines, e.g. ``"\\n\\n"``). Models are
Llama / Qwen2 / Mistral configurations with a few layers, hidden size 96 and
grouped-query attention 6:2 (the 3:1 ratio of Llama-3.2-3B). Weights are drawn
with a seed and a wide init so that logits are well spread (greedy ties are
then vanishingly unlikely).
"""

from __future__ import annotations

import functools
import random

import torch

CORPUS = [
    "Answer the question based on general world knowledge. Provide a short and direct answer.",
    "Q: What is the capital of France?\nA: Paris",
    "Q: Who wrote the novel Moby Dick?\nA: Herman Melville",
    "Q: Which river flows through Cairo?\nA: the Nile",
    "Predict the [MASK] in the sentence in one word.",
    "Q: The mother tongue of Jean Reno is [MASK].\nA: French",
    "Q: In which country is the city of Kyoto located?\nA: Japan\n\n",
    "what language do people speak in brazil? which team did michael jordan play for?",
    "where is the eiffel tower? when was the university founded? who is the president?",
]

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0, attn: str = "eager",
               hidden: int = 96, heads: int = 6, kv_heads: int = 2, init: float = 0.2,
               head_dim: int | None = None):
    """A random-initialised causal LM of family ``arch`` (llama, qwen2, mistral), fp32, eval mode.
    ``head_dim`` defaults to hidden / heads (the CUDA kernels need 64 or 128)."""
    import transformers

    tok = tiny_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=1024,
        initializer_range=init,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(f"arch must be llama, qwen2 or mistral, got {arch!r}")
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn)
    model.eval()
    return model


WORDS = ["what", "who", "where", "capital", "river", "city", "language", "speak", "country",
         "novel", "team", "play", "president", "founded", "tower", "located", "mother", "tongue",
         "the", "of", "is", "in", "did", "do", "people", "which", "when", "was"]


def random_text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def random_questions(n: int, seed: int = 0, max_paraphrases: int = 5, tokenizer=None):
    """``n`` random questions of varying lengths and paraphrase counts (1..max)."""
    from segflex.generate import encode_question

    tok = tokenizer or tiny_tokenizer()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prefix = "Answer the question.\n\n" + random_text(rng, 0, 12) + "\n\nQ: "
        paras = [random_text(rng, 1, 9) + "?" for _ in range(rng.randint(1, max_paraphrases))]
        out.append(encode_question(tok, prefix, paras, "\nA:"))
    return out

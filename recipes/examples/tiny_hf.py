"""A tiny Hugging Face Llama and byte-level text data, made on the spot (nothing downloaded).

Shared by the bring-your-own-loop examples (``recipes/examples/hf_trainer_sp.py``,
``recipes/examples/accelerate_sp.py``). Tokens are the text's UTF-8 bytes (0..255), 256 ends a
document. Documents are short generated sentences; every call with the same arguments
returns the same data, on every rank.
"""
from __future__ import annotations

import argparse
import random

import torch

from ringattn.layouts import LAYOUTS

EOS = 256
VOCAB = 257
_WORDS = ("ring", "attention", "passes", "keys", "and", "values", "around", "the", "ranks", "while",
          "each", "block", "is", "computed", "exactly", "merged", "in", "fp32", "long", "context")


def tiny_llama(seed: int = 0, attn_implementation: str = "eager"):
    """A 2-layer Llama (hidden 64, 4 heads, 2 kv heads) with weights from ``seed``, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).float()


def byte_tokenizer():
    """A transformers tokenizer whose ids are the text's UTF-8 bytes, 256 = "<eos>" (also the pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer emits
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {chars[b]: b for b in range(256)} | {"<eos>": EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def texts(n: int, seed: int = 0) -> list[str]:
    """The documents of ``documents(n, seed)`` as text (without the EOS)."""
    return [bytes(d[:-1]).decode() for d in documents(n, seed)]


def documents(n: int, seed: int = 0, min_words: int = 3, max_words: int = 14) -> list[list[int]]:
    """n byte-tokenised documents of min_words..max_words words, each ending with EOS."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))) + "."
        docs.append(list(text.encode()) + [EOS])
    return docs


def packed_examples(n: int, seed: int = 0) -> list[dict]:
    """One example per document (for ``DataCollatorWithFlattening``)."""
    return [{"input_ids": d, "labels": list(d)} for d in documents(n, seed)]


def chunked_examples(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """n examples of exactly seq_len tokens cut from the concatenated documents (default collator)."""
    stream: list[int] = []
    k = 0
    while len(stream) < n * seq_len:
        stream += sum(documents(64, seed * 1000 + k), [])
        k += 1
    return [{"input_ids": torch.tensor(stream[i * seq_len:(i + 1) * seq_len]),
             "labels": torch.tensor(stream[i * seq_len:(i + 1) * seq_len])} for i in range(n)]


def example_arguments(doc: str) -> argparse.ArgumentParser:
    """The command-line options both examples share (SP shape, data, steps); each adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--sp-size", type=int, default=2, help="ranks sharing one sequence (dp = world / sp)")
    p.add_argument("--strategy", default="ring", choices=["ring", "ulysses", "hybrid"])
    p.add_argument("--layout", default="zigzag", choices=sorted(LAYOUTS), help="doc_zigzag needs --packing")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses ranks per ring position (hybrid)")
    p.add_argument("--packing", action="store_true",
                   help="variable-length documents packed by DataCollatorWithFlattening (else 64-token chunks)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences (packing: documents) per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model-path", default=None,
                   help="a local transformers causal LM to fine-tune instead of the tiny Llama (e.g. a "
                        "hybrid); its vocabulary must cover the byte tokens (0..256)")
    return p


def example_model(args):
    """The model the examples fine-tune: ``--model-path`` (fp32, eager attention) or the tiny Llama."""
    if args.model_path is None:
        return tiny_llama(seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_path, attn_implementation="eager")
    if model.config.vocab_size < VOCAB:
        raise ValueError(f"--model-path {args.model_path}: vocabulary {model.config.vocab_size} < {VOCAB} "
                         "(the examples' byte tokens)")
    return model.float()

"""The tokenise-once text pipeline (recipes/token_cache.py, recipes/data.py PackedText).

The reference packer is the straightforward one: tokenise every document in a Python loop,
append EOS, concatenate, cut into seq_len+1 windows, scan each window for EOS.
"""
from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch

from recipes import data, token_cache


def _corpus(tmp_path, n=40, field="body"):
    docs = ["doc %d: " % i + "words and more é " * (i % 9) for i in range(n)]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({field: d, "other": i}) + "\n" for i, d in enumerate(docs)))
    return f, docs


def _reference(docs, seq_len):
    tok = data.ByteTokenizer()
    ids = []
    for d in docs:
        ids += tok.encode(d) + [tok.EOS]
    win = seq_len + 1
    w = torch.tensor(ids[: len(ids) // win * win]).view(-1, win)
    out = []
    for row in w:
        tokens, labels = row[:-1], row[1:].clone()
        ends = (tokens == tok.EOS).nonzero().flatten() + 1
        labels[tokens == tok.EOS] = data.IGNORE_INDEX
        cu = torch.cat([torch.zeros(1, dtype=torch.long), ends[ends < len(tokens)], torch.tensor([len(tokens)])])
        out.append((tokens, labels, cu.to(torch.int32)))
    return out


def _cfg(tmp_path, f, **kw):
    return data.DataConfig(kind="text", files=[str(f)], text_field="body", cache_dir=str(tmp_path / "cache"),
                           tokenize_procs=2, **kw)


def test_packing_matches_reference_and_epochs_permute(tmp_path):
    f, docs = _corpus(tmp_path)
    ds = data.PackedText(_cfg(tmp_path, f, seq_len=24), seed=5, tokenizer=data.ByteTokenizer())
    ref = _reference(docs, 24)
    assert len(ds) == len(ref) > 20
    seen = set()
    for i in range(2 * len(ds)):
        w = ds.window(i)
        seen.add((i // len(ds), w))
        for got, want in zip(ds.sample(i), ref[w]):
            assert torch.equal(got, want), (i, w)
    assert seen == {(e, w) for e in (0, 1) for w in range(len(ds))}  # each epoch: every window once
    order0 = [ds.window(i) for i in range(len(ds))]
    assert order0 != sorted(order0) and order0 != [ds.window(len(ds) + i) for i in range(len(ds))]
    again = data.PackedText(_cfg(tmp_path, f, seq_len=24), seed=5, tokenizer=data.ByteTokenizer())
    assert [again.window(i) for i in range(len(ds))] == order0  # seeded: resumable from any index


def test_cache_is_reused_and_keyed_by_files_and_settings(tmp_path):
    f, _ = _corpus(tmp_path)
    tok = data.ByteTokenizer()
    first = token_cache.load([str(f)], "body", tok, str(tmp_path / "cache"), 1)
    second = token_cache.load([str(f)], "body", tok, str(tmp_path / "cache"), 1)
    assert first.build_s > 0 and second.build_s == 0.0 and first.path == second.path
    assert np.array_equal(first.tokens, second.tokens) and isinstance(second.tokens, np.memmap)
    assert first.tokens.dtype == np.uint16
    f.write_text(f.read_text() + json.dumps({"body": "one more"}) + "\n")
    changed = token_cache.load([str(f)], "body", tok, str(tmp_path / "cache"), 1)
    assert changed.path != first.path and changed.build_s > 0
    assert len(changed.doc_ends) == len(first.doc_ends) + 1
    with pytest.raises(ValueError, match="text_field='text' is not a column"):
        token_cache.load([str(f)], "text", tok, str(tmp_path / "cache"), 1)
    with pytest.raises(ValueError, match="one format"):
        token_cache.load([str(f), str(tmp_path / "x.txt")], "body", tok, str(tmp_path / "cache"), 1)


def _load_in_process(args):
    path, cache = args
    store = token_cache.load([path], "body", data.ByteTokenizer(), cache, 1)
    return store.build_s > 0, store.path


def test_concurrent_ranks_build_once(tmp_path):
    f, _ = _corpus(tmp_path, n=400)
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_load_in_process, [(str(f), str(tmp_path / "cache"))] * 3)
    assert sum(built for built, _ in results) == 1, results  # one builder, the others waited
    assert len({p for _, p in results}) == 1
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def _hf_tokenizer(path):
    """A tiny word-level Hugging Face tokenizer saved locally (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("doc words and more é".split())}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def test_hf_tokenizer_through_parallel_map(tmp_path):
    f, docs = _corpus(tmp_path)
    tok = data.HFTokenizer(_hf_tokenizer(str(tmp_path / "tok")))
    store = token_cache.load([str(f)], "body", tok, str(tmp_path / "cache"), 2)
    want = np.concatenate([np.array(tok.encode(d) + [tok.EOS]) for d in docs])
    assert np.array_equal(np.asarray(store.tokens), want)
    assert np.array_equal(store.doc_ends, np.cumsum([len(tok.encode(d)) + 1 for d in docs]))
    # a different tokenizer (same files) is a different cache entry
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        (tmp_path / "tok" / "tokenizer_config.json").read_text().replace("[UNK]", "[UNK]", 1) + "\n")
    assert token_cache.load([str(f)], "body", data.HFTokenizer(str(tmp_path / "tok")),
                            str(tmp_path / "cache"), 1).path != store.path

"""Tokenise a local corpus once: a flat, memory-mapped token file shared by runs and ranks.

``load(files, text_field, tokenizer, cache_dir, num_proc)`` -> ``TokenStore`` with
    tokens     (n_tokens,) uint16/uint32 memmap: every document's ids followed by EOS
    doc_ends   (n_docs,) int64 memmap: the position after each document's EOS, increasing
The cache entry is keyed by the files (absolute path, size, mtime), the tokenizer's
fingerprint and the settings, so a changed file or tokenizer builds a new entry. The first
process to take the entry's file lock builds it with ``datasets.map(batched=True,
num_proc=N)`` into a temporary directory and renames it into place; every other process
(other ranks of the node, later runs) waits on the lock and then only memory-maps the
result. No process group is needed, so this works before or without torch.distributed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

FORMAT = 1  # bump when the on-disk layout changes
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TokenStore:
    path: str
    tokens: np.ndarray    # (n_tokens,) memmap
    doc_ends: np.ndarray  # (n_docs,) int64 memmap
    build_s: float        # seconds spent tokenising in this process (0.0: reused)


def cache_key(files, text_field: str, tokenizer) -> str:
    parts = {"format": FORMAT, "text_field": text_field, "tokenizer": tokenizer.fingerprint(),
             "eos": int(tokenizer.EOS), "files": []}
    for f in files:
        st = os.stat(f)
        parts["files"].append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load(files, text_field: str, tokenizer, cache_dir: str, num_proc: int) -> TokenStore:
    """The cached token store of ``files`` (built here if no process has built it yet)."""
    files = list(files)
    builders = {BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"data.files must all be one format (.txt, .jsonl/.json or .parquet); got {files}")
    os.makedirs(cache_dir, exist_ok=True)
    entry = os.path.join(cache_dir, cache_key(files, text_field, tokenizer))
    build_s = 0.0
    if not os.path.exists(os.path.join(entry, "meta.json")):
        with open(entry + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then reuse
            try:
                if not os.path.exists(os.path.join(entry, "meta.json")):
                    t0 = time.perf_counter()
                    _build(entry, files, builders.pop(), text_field, tokenizer, num_proc)
                    build_s = time.perf_counter() - t0
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return _open(entry, build_s)


def _open(entry: str, build_s: float) -> TokenStore:
    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    tokens = np.memmap(os.path.join(entry, "tokens.bin"), dtype=meta["dtype"], mode="r",
                       shape=(meta["n_tokens"],))
    doc_ends = np.load(os.path.join(entry, "doc_ends.npy"), mmap_mode="r")
    return TokenStore(entry, tokens, doc_ends, build_s)


def _tokenize(batch, *, tokenizer, text_field):
    ids = tokenizer.encode_batch(batch[text_field])
    return {"ids": [np.append(np.asarray(x), tokenizer.EOS) for x in ids]}


def _build(entry, files, builder, text_field, tokenizer, num_proc):
    import datasets

    tmp = f"{entry}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    hf_cache = os.path.join(tmp, "hf")  # datasets' own arrow copies, dropped once flattened
    ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache)
    if text_field not in ds.column_names:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"data.text_field={text_field!r} is not a column of data.files "
                         f"(columns: {ds.column_names})")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    feature = datasets.Value("uint16" if dtype == np.uint16 else "uint32")
    ds = ds.map(_tokenize, batched=True, num_proc=num_proc if len(ds) > 1 else None,
                fn_kwargs={"tokenizer": tokenizer, "text_field": text_field},
                remove_columns=ds.column_names,
                features=datasets.Features({"ids": datasets.Sequence(feature)}),
                cache_file_name=os.path.join(hf_cache, "tokens.arrow"),
                new_fingerprint=os.path.basename(entry), desc="tokenising")
    n_tokens, ends = 0, []
    with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
        column = ds.data.column("ids")
        # arrow list slices of <= 4096 documents: flat values + offsets, bounded memory
        for chunk in (c.slice(i, 4096) for c in column.chunks for i in range(0, len(c), 4096)):
            offsets = chunk.offsets.to_numpy()
            values = chunk.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
            out.write(values.astype(dtype, copy=False).tobytes())
            ends.append(n_tokens + offsets[1:].astype(np.int64) - offsets[0])
            n_tokens += len(values)
    np.save(os.path.join(tmp, "doc_ends.npy"), np.concatenate(ends) if ends else np.zeros(0, np.int64))
    del ds
    shutil.rmtree(hf_cache, ignore_errors=True)
    with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last: its presence = complete
        json.dump({"n_tokens": n_tokens, "n_docs": int(sum(len(e) for e in ends)),
                   "dtype": np.dtype(dtype).name, "files": files, "text_field": text_field,
                   "tokenizer": tokenizer.fingerprint()}, f)
    shutil.rmtree(entry, ignore_errors=True)  # a stale, incomplete entry (no meta.json)
    os.rename(tmp, entry)

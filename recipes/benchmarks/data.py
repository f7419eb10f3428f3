"""Text-data pipeline benchmark: tokenise-once build, cache reuse and packed-sample reading.

    python -m recipes.benchmarks.data phase=generate path=/tmp/corpus200m.jsonl chars=200000000
    python -m recipes.benchmarks.data phase=build path=/tmp/corpus200m.jsonl cache=/tmp/tokcache procs=2
    python -m recipes.benchmarks.data phase=read path=/tmp/corpus200m.jsonl cache=/tmp/tokcache seq_len=8192

``generate``: a seeded JSONL corpus of random words, log-normal document lengths.
``build``: tokenise it (byte tokenizer, or ``tokenizer=`` a local HF tokenizer) into the
cache, timed: tokens/s of the build. ``read``: what a training rank does — open the cache
(reused, not rebuilt), build ``PackedText`` and read ``samples`` packed sequences with
document boundaries in epoch order: time to the first sample, tokens/s, resident memory
(RssAnon: the process's own; RssFile: mapped page cache of the token file) of the process. Run each phase in its own process so that its
memory is its own. Prints one JSON line per phase.
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from recipes.choices import Choice

Phase = Choice("Phase", {name: name for name in ("generate", "build", "read")})


@dataclass
class DataBenchConfig:
    phase: Phase = MISSING  # generate | build | read (each in its own process)
    path: str = MISSING  # the JSONL corpus (written by generate, read by build and read)
    chars: int = 200_000_000  # generate: corpus size in characters
    mean_doc_chars: int = 4096  # generate: mean document length (log-normal, sigma 1)
    seed: int = 0  # generate
    cache: str = "/tmp/ringattn_token_cache"  # build, read: the token cache directory
    procs: int = os.cpu_count() or 1  # build: tokenising processes
    tokenizer: Optional[str] = None  # build, read: a local HF tokenizer; null: bytes
    seq_len: int = 8192  # read
    samples: int = 2000  # read


ConfigStore.instance().store(name="benchmark_data_schema", node=DataBenchConfig)


def _rss_mib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    # RssAnon: the process's own memory; RssFile: mapped page cache of the token file (shared
    # by the ranks of a node, dropped by the kernel under pressure), grows with pages touched
    return {"rss_mib": out.get("VmRSS"), "peak_rss_mib": out.get("VmHWM"),
            "anon_rss_mib": out.get("RssAnon"), "file_rss_mib": out.get("RssFile")}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (datasets.map workers): on a
    shared machine this is steadier than wall time."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def generate(path: str, chars: int, mean_doc_chars: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=n))
                      for n in rng.integers(2, 10, size=5000)])
    sigma = 1.0
    mu = np.log(mean_doc_chars) - sigma**2 / 2
    written, docs = 0, 0
    with open(path, "w") as f:
        while written < chars:
            n_words = max(1, int(np.exp(rng.normal(mu, sigma)) / 6))  # ~6 chars per word
            text = " ".join(words[rng.integers(0, len(words), size=n_words)])
            f.write(json.dumps({"text": text}) + "\n")
            written, docs = written + len(text), docs + 1
    return {"phase": "generate", "path": path, "chars": written, "documents": docs,
            "bytes": os.path.getsize(path)}


def _tokenizer(path):
    from recipes.data import ByteTokenizer, HFTokenizer

    return ByteTokenizer() if path is None else HFTokenizer(path)


def build(path: str, cache: str, procs: int, tokenizer) -> dict:
    from recipes import token_cache

    t0, c0 = time.perf_counter(), _cpu_s()
    store = token_cache.load([path], "text", _tokenizer(tokenizer), cache, procs)
    dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return {"phase": "build", "tokens": len(store.tokens), "documents": len(store.doc_ends),
            "seconds": dt, "tokens_per_s": len(store.tokens) / dt, "cpu_s": cpu,
            "tokens_per_cpu_s": len(store.tokens) / cpu, "rebuilt": store.build_s > 0,
            "procs": procs, **_rss_mib()}


def read(path: str, cache: str, seq_len: int, samples: int, tokenizer) -> dict:
    from recipes.data import DataConfig, PackedText

    t0 = time.perf_counter()
    cfg = DataConfig(kind="text", seq_len=seq_len, files=[path], cache_dir=cache, tokenize_procs=1)
    ds = PackedText(cfg, seed=0, tokenizer=_tokenizer(tokenizer))
    ds.sample(0)
    first = time.perf_counter() - t0
    after_open = _rss_mib()["anon_rss_mib"]
    t1, c1 = time.perf_counter(), _cpu_s()
    n = 0
    for i in range(samples):
        tokens, labels, cu = ds.sample(i)
        n += len(tokens)
    dt, cpu = time.perf_counter() - t1, _cpu_s() - c1
    return {"phase": "read", "corpus_tokens": len(ds.store.tokens), "windows": len(ds),
            "rebuilt": ds.store.build_s > 0, "first_sample_s": first, "samples": samples,
            "tokens_per_s": n / dt, "tokens_per_cpu_s": n / max(cpu, 1e-9), "anon_rss_after_open_mib": after_open, **_rss_mib()}


@hydra.main(config_path="../../conf", config_name="benchmarks/data", version_base=None)
def main(cfg) -> None:
    a: DataBenchConfig = OmegaConf.to_object(cfg)
    if a.phase == "generate":
        res = generate(a.path, a.chars, a.mean_doc_chars, a.seed)
    elif a.phase == "build":
        res = build(a.path, a.cache, a.procs, a.tokenizer)
    else:
        res = read(a.path, a.cache, a.seq_len, a.samples, a.tokenizer)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

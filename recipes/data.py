"""Data for the training recipe: a synthetic long-range passkey task (default), local
text files packed into sequences, and a shared-prompt task (one prompt, several responses
packed after it, under ``ringattn.RangeMask.shared_prefix``).

Every sample is a pure function of (seed, index), so the samples of step k are the same
whatever dp / sp / gradient accumulation are. Labels are shifted on the *full* sequence
here, before any sequence-parallel sharding; positions that carry no loss are -100.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from recipes import token_cache
from recipes.choices import Choice, at_least

IGNORE_INDEX = -100


class Kind(Choice):
    passkey = "passkey"  # the synthetic long-range task
    text = "text"  # local text files
    shared_prompt = "shared_prompt"  # one prompt + several responses per sequence (a RangeMask)


@dataclass
class DataConfig:
    kind: Kind = Kind.passkey
    seq_len: int = 256
    global_batch_size: int = 16  # sequences per optimizer step: the single source of truth
    micro_batch_size: Optional[int] = None  # per data-parallel rank and forward; None: no accumulation
    # passkey task: "...filler...#d1..dn...filler...?d1..dn"; loss and accuracy on the answer digits
    passkey_digits: int = 1  # 2+: the answer continues the passkey (an induction-style copy; slower to learn)
    # needle depth range: 0 = the first token, 1 = just before the query (PasskeyTask.needle_at,
    # the same depth eval_needle uses); the default covers the whole context
    needle_min_frac: float = 0.0
    needle_max_frac: float = 1.0
    eval_batch_size: int = 64
    # text files (txt / jsonl / json / parquet) read by `datasets`, packed into sequences
    files: List[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: Optional[str] = None  # local path of a Hugging Face tokenizer; None: bytes
    # tokenised once into this directory (keyed by files, tokenizer and settings), then
    # memory-mapped by every run and rank; None: ~/.cache/ringattn/tokens
    cache_dir: Optional[str] = None
    tokenize_procs: Optional[int] = None  # datasets.map workers for the one build; None: CPU count
    # packed text: attend only within each document (RoPE positions restart per document);
    # ring attention takes document boundaries for one sequence at a time, so micro-batch 1
    document_masking: bool = True
    # shared_prompt task: responses packed after each prompt (each sees the prompt and
    # itself only); the prompt takes half of seq_len, the responses share the rest
    responses: int = 4

    def __post_init__(self):
        for name in ("seq_len", "global_batch_size", "passkey_digits", "eval_batch_size", "responses"):
            at_least(f"data.{name}", getattr(self, name))
        at_least("data.micro_batch_size", self.micro_batch_size, allow_none=True)
        if not 0.0 <= self.needle_min_frac <= self.needle_max_frac <= 1.0:  # equal: a fixed depth
            raise ValueError(f"data.needle_min_frac={self.needle_min_frac}, data.needle_max_frac="
                             f"{self.needle_max_frac}: need 0 <= min <= max <= 1 (needle depths)")


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus three specials."""

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def fingerprint(self) -> str:
        return "bytes-utf8-v1"


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = path
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        self.EOS = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts) -> List[List[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def fingerprint(self) -> str:
        """Content hash of the tokenizer files: a changed tokenizer is a new cache entry."""
        h = hashlib.sha256()
        files = [self.path] if os.path.isfile(self.path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(self.path) for f in fs)
        for f in files:
            h.update(os.path.relpath(f, self.path).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
        return "hf-" + h.hexdigest()[:16]


def build_tokenizer(cfg: DataConfig):
    return ByteTokenizer() if cfg.tokenizer is None else HFTokenizer(cfg.tokenizer)


class PasskeyTask:
    """Random lowercase filler; a needle ``#`` + n digits at a depth drawn from
    [needle_min_frac, needle_max_frac] of the context; at the end a query ``?`` followed by
    the same digits. Only the answer digits carry loss, so nothing is learnable without
    attending from the end of the sequence to the needle."""

    FILLER = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8).astype(np.int64)
    DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8).astype(np.int64)
    KEY, QUERY = ord("#"), ord("?")
    chance = 1.0 / 10

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        n, L = cfg.passkey_digits, cfg.seq_len
        lo, hi = cfg.needle_min_frac, cfg.needle_max_frac  # checked by DataConfig
        if n < 1 or L < 2 * n + 2:
            raise ValueError(f"data.seq_len={L} is too short for a passkey of {n} digits "
                             f"(needs at least {2 * n + 2} tokens) or passkey_digits < 1")
        self.lo, self.hi = self.needle_at(lo, L, n), self.needle_at(hi, L, n)

    @staticmethod
    def needle_at(depth: float, length: int, digits: int) -> int:
        """Token index of the needle marker at ``depth`` in [0, 1] of a ``length`` sequence:
        0 -> the first token, 1 -> the needle ends just before the query marker."""
        return int(round(depth * (length - 2 * digits - 1)))

    @classmethod
    def make(cls, length: int, digits: int, at: int, rng: np.random.Generator):
        """(tokens, labels) of ``length`` with the needle marker at token ``at``; labels on
        the answer digits only, shifted on the full sequence."""
        n = digits
        seq = cls.FILLER[rng.integers(0, len(cls.FILLER), size=length + 1)]
        key = cls.DIGITS[rng.integers(0, 10, size=n)]
        seq[at] = cls.KEY
        seq[at + 1 : at + 1 + n] = key
        q = length - n  # seq has length+1 tokens; the last n are the answer, after the query marker
        seq[q] = cls.QUERY
        seq[q + 1 :] = key
        tokens = torch.from_numpy(seq[:-1].copy())
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        labels[q:] = torch.from_numpy(seq[q + 1 :].copy())
        return tokens, labels

    def sample(self, index: int):
        rng = np.random.Generator(np.random.PCG64([self.seed, index]))
        at = int(rng.integers(self.lo, self.hi + 1))
        return self.make(self.cfg.seq_len, self.cfg.passkey_digits, at, rng)


class PackedText:
    """Local text files, tokenised once (``recipes.token_cache``), cut into ``seq_len + 1``
    token windows read memory-mapped; documents end after their EOS.

    Window w covers tokens [w*(seq_len+1), (w+1)*(seq_len+1)); epoch e visits the windows in
    a permutation seeded by (seed, e), drawn once per epoch. Resident memory is one
    permutation (8 bytes per window) plus the pages of the windows read.
    """

    chance = None

    def __init__(self, cfg: DataConfig, seed: int, tokenizer):
        check_files(cfg)
        cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "ringattn", "tokens")
        procs = cfg.tokenize_procs or min(16, os.cpu_count() or 1)
        self.store = token_cache.load(cfg.files, cfg.text_field, tokenizer, cache, procs)
        self.win = cfg.seq_len + 1
        self.n = len(self.store.tokens) // self.win
        if self.n == 0:
            raise ValueError(f"data.files hold {len(self.store.tokens)} tokens: fewer than one "
                             f"sequence of {self.win}")
        self.seed, self.documents = seed, cfg.document_masking
        self._epoch_perm = (None, None)  # one attribute: read and replaced atomically

    def __len__(self) -> int:
        return self.n

    def window(self, index: int) -> int:
        """The window the ``index``-th sample reads (epoch permutations drawn once each)."""
        epoch, i = divmod(index, self.n)
        # the planning thread (PlannedBatches) and evaluation may read different epochs at
        # once: one (epoch, permutation) pair, never a new epoch with an old permutation
        cached = self._epoch_perm
        if cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            cached = self._epoch_perm = (epoch, rng.permutation(self.n))
        return int(cached[1][i])

    def sample(self, index: int):
        start = self.window(index) * self.win
        w = torch.from_numpy(self.store.tokens[start:start + self.win].astype(np.int64))
        tokens, labels = w[:-1], w[1:].clone()
        if not self.documents:
            return tokens, labels
        # Documents ending inside the window (an end at the window's last token closes it).
        ends = self.store.doc_ends
        lo, hi = np.searchsorted(ends, [start + 1, start + len(tokens)], side="left")
        local = torch.from_numpy(np.asarray(ends[lo:hi], dtype=np.int64) - start)
        labels[local - 1] = IGNORE_INDEX  # an EOS predicts nothing across the boundary
        last = ends[hi] - start if hi < len(ends) else None
        if last == len(tokens):
            labels[-1] = IGNORE_INDEX
        cu = torch.cat([torch.zeros(1, dtype=torch.long), local, torch.tensor([len(tokens)])])
        return tokens, labels, cu.to(torch.int32)


class SharedPromptTask:
    """One prompt, several responses, packed into one sequence of ``seq_len`` tokens.

    The prompt (the first half) is random lowercase filler holding a needle ``#`` + n digits;
    each response is ``?`` + the same digits + filler, of a length drawn per sample. Under
    ``RangeMask.shared_prefix`` a response sees the prompt and itself, never another
    response, so each must find the needle in the prompt: loss on every response's answer
    digits. Positions are the packed ones (0 .. seq_len - 1). Sample i is a pure function of
    (seed, i); returns (tokens, labels, mask).
    """

    chance = None  # no accuracy evaluation (the eval path runs without per-sample masks)

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        n, r = cfg.passkey_digits, cfg.responses
        self.prompt = cfg.seq_len // 2
        self.shortest = n + 2  # "?" + the answer + one filler token
        if self.prompt < n + 1 or cfg.seq_len - self.prompt < r * self.shortest:
            raise ValueError(f"data.seq_len={cfg.seq_len} is too short for a prompt with a "
                             f"{n}-digit needle and {r} responses of >= {self.shortest} tokens")

    def sample(self, index: int):
        import ringattn

        rng = np.random.Generator(np.random.PCG64([self.seed, index]))
        n, r, length = self.cfg.passkey_digits, self.cfg.responses, self.cfg.seq_len
        rest = length - self.prompt
        cuts = np.sort(rng.choice(np.arange(1, rest - r * self.shortest + r), r - 1, replace=False)) \
            if r > 1 else np.array([], dtype=np.int64)
        lengths = np.diff(np.concatenate([[0], cuts, [rest - r * self.shortest + r]])) - 1 + self.shortest
        seq = PasskeyTask.FILLER[rng.integers(0, len(PasskeyTask.FILLER), size=length)]
        key = PasskeyTask.DIGITS[rng.integers(0, 10, size=n)]
        at = int(rng.integers(0, self.prompt - n))
        seq[at] = PasskeyTask.KEY
        seq[at + 1:at + 1 + n] = key
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        start = self.prompt
        for m in lengths.tolist():
            seq[start] = PasskeyTask.QUERY
            seq[start + 1:start + 1 + n] = key
            labels[start:start + n] = torch.from_numpy(key.copy())  # "?" predicts digit 1, ...
            start += m
        mask = ringattn.RangeMask.shared_prefix(self.prompt, lengths.tolist())
        return torch.from_numpy(seq.copy()), labels, mask


def shard_batch(sp, batch, device, model=None):
    """A micro-batch (tokens, labels, cu_seqlens | RangeMask | None) -> this rank's
    (tokens, labels, positions or None, the model's attention keywords). With a RangeMask,
    ``doc_zigzag`` places tokens by its segments and positions are the packed ones. With
    ``model`` (ours or the HF adapter: ``build_plan``), the keywords carry the forward's
    attention plan, built here on the host (its collective waits for the forward)."""
    import ringattn

    tokens, labels, rule = batch
    if isinstance(rule, ringattn.RangeMask):
        place = rule.cu_seqlens
        pos = sp.shard(torch.arange(tokens.shape[1]), dim=0, cu_seqlens=place).to(device) \
            if ringattn.layout_needs_documents(sp.layout) else None
        kw = {"mask": rule}
    else:
        place = rule
        pos = None if rule is None else sp.positions(tokens.shape[1], device=device, cu_seqlens=rule)
        kw = {} if rule is None else {"cu_seqlens": rule.to(device)}
    local = sp.shard(tokens.to(device), cu_seqlens=place)
    if model is not None:
        kw["plan"] = model.build_plan(local.shape, device=local.device, **{
            k: v for k, v in kw.items() if k in ("cu_seqlens", "mask")})
    return local, sp.shard(labels.to(device), cu_seqlens=place), pos, kw


class PlannedBatches:
    """Each optimizer step's sharded micro-batches with their attention plans, the next
    step's made in a background thread while this step runs, so that planning (host work:
    sharding indices, every layer's block tasks) never holds the device up. Plans are built
    without communication; each forward's ``agree`` makes the step's collective.

    ``take(step)``: the micro-batches of ``step`` (0-based, as ``StepBatches``), then starts
    on ``step + 1``. A step asked out of order is made on the spot."""

    def __init__(self, batches: "StepBatches", sp, device, model):
        from concurrent.futures import ThreadPoolExecutor

        self.batches, self.sp, self.device, self.model = batches, sp, device, model
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ringattn-plan")
        self._ahead: tuple[int, object] | None = None

    def _make(self, step: int):
        return [shard_batch(self.sp, b, self.device, self.model) for b in self.batches.micro_batches(step)]

    def take(self, step: int):
        ahead, self._ahead = self._ahead, None
        made = ahead[1].result() if ahead is not None and ahead[0] == step else self._make(step)
        self._ahead = (step + 1, self._pool.submit(self._make, step + 1))
        return made

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def check_files(cfg: DataConfig) -> None:
    if cfg.tokenizer is not None and not os.path.exists(cfg.tokenizer):
        raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer}: no such local tokenizer directory or file")
    if cfg.kind != Kind.text:
        return
    if not cfg.files:
        raise ValueError("data.kind=text needs data.files=[...] (local txt / jsonl / parquet files)")
    for f in cfg.files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"data file not found: {f}")
        if os.path.splitext(f)[1].lower() not in (".txt", ".jsonl", ".json", ".parquet"):
            raise ValueError(f"data file {f}: expected .txt, .jsonl, .json or .parquet")


def build_dataset(cfg: DataConfig, seed: int, tokenizer):
    if cfg.kind == Kind.shared_prompt:
        return SharedPromptTask(cfg, seed)
    return PasskeyTask(cfg, seed) if cfg.kind == Kind.passkey else PackedText(cfg, seed, tokenizer)


EVAL_OFFSET = 1 << 40  # eval samples come from an index range training never reaches


class StepBatches:
    """The micro-batches one data-parallel rank consumes at optimizer step ``step``.

    Step k covers global sample indices [k*G, (k+1)*G); DP rank d takes the d-th contiguous
    slice of G/dp sequences and cuts it into micro-batches of ``micro`` sequences."""

    def __init__(self, dataset, global_batch: int, dp_rank: int, dp_size: int, micro: int):
        self.ds, self.G, self.dp_rank, self.dp_size, self.micro = dataset, global_batch, dp_rank, dp_size, micro

    def _stack(self, indices):
        """(tokens, labels, cu_seqlens | RangeMask | None); the third only for one packed sequence."""
        samples = [self.ds.sample(i) for i in indices]
        toks, labs = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        if len(samples[0]) == 2:
            return toks, labs, None
        if len(samples) != 1:
            raise ValueError("document masking and range masks need one sequence per forward "
                             "(data.micro_batch_size=1)")
        return toks, labs, samples[0][2]

    def micro_batches(self, step: int):
        per_rank = self.G // self.dp_size
        start = step * self.G + self.dp_rank * per_rank
        return [self._stack(range(s, s + self.micro)) for s in range(start, start + per_rank, self.micro)]

    def eval_batch(self, size: int):
        per_rank = size // self.dp_size
        start = EVAL_OFFSET + self.dp_rank * per_rank
        return self._stack(range(start, start + per_rank))

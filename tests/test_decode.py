"""decode_attention over a KV cache sharded unevenly across real process groups, against
float64 attention over the whole cache.

Tolerance (fp32): max-abs error <= 1e-5 of the reference's max-abs, as for ring attention
(tests/test_ring_attention.py): one kernel call per rank plus a fp32 combine of P terms
stays far below it, while a lost shard, a wrong weight or a missing rescale is far above.
"""
from __future__ import annotations

import pytest
import torch

import ringattn
from tests.distributed import run_distributed, worlds
from tests.reference import reference_attention, rel_err

TOL = 1e-5
# (cache length of each rank, heads, kv_heads, t): uneven, with empty shards, GQA/MQA, t > 1
CASES = {
    2: [((5, 0), 4, 4, 1), ((3, 11), 8, 2, 3), ((0, 7), 4, 1, 2)],
    3: [((0, 4, 9), 8, 2, 1), ((6, 6, 1), 4, 4, 4), ((2, 0, 0), 4, 2, 1)],
    4: [((1, 0, 6, 3), 8, 2, 1), ((4, 9, 0, 2), 4, 1, 3), ((8, 8, 8, 8), 4, 4, 1)],
}


def _case(seed, lengths, heads, kv_heads, t, batch=2, head_dim=16):
    gen = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    q = torch.randn(batch, t, heads, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, s, kv_heads, head_dim, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(batch, s, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    return q, k, v


def _errors(rank, world):
    errs = []
    for i, (lengths, heads, kv_heads, t) in enumerate(CASES[world]):
        q, k, v = _case(i, lengths, heads, kv_heads, t)
        ref_out, ref_lse, *_ = reference_attention(q, k, v, torch.zeros_like(q), causal=False)
        start = sum(lengths[:rank])
        mine = slice(start, start + lengths[rank])
        out, lse = ringattn.decode_attention(q.float(), k[:, mine].float(), v[:, mine].float(),
                                             return_lse=True, check_q=True)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert out.shape == q.shape and lse.shape == (q.shape[0], heads, t)
        errs.append((lengths, rel_err(out, ref_out), rel_err(lse, ref_lse)))
    # Softcap (in the kernel) and sinks (once, after the combine), uneven parts.
    lengths = (3, 0, 5, 2)[:world] if world > 2 else (4, 3)
    q, k, v = _case(9, lengths, 4, 2, 2)
    sinks = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    ref_out, ref_lse, *_ = reference_attention(q, k, v, torch.zeros_like(q), causal=False, softcap=2.5,
                                               sinks=sinks)
    start = sum(lengths[:rank])
    mine = slice(start, start + lengths[rank])
    out, lse = ringattn.decode_attention(q.float(), k[:, mine].float(), v[:, mine].float(), return_lse=True,
                                         softcap=2.5, sinks=sinks.float())
    errs.append((("softcap+sinks", *lengths), rel_err(out, ref_out), rel_err(lse, ref_lse)))
    # The whole cache empty: no key anywhere -> out 0, lse -inf (as the merge defines it).
    q, k, v = _case(0, (0,), 4, 2, 1)
    out, lse = ringattn.decode_attention(q.float(), k.float(), v.float(), return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # A rank with different queries is refused by the debug check, on every rank.
    q_bad = q.float() + (rank == world - 1)
    with pytest.raises(ValueError, match="q differs across the ranks"):
        ringattn.decode_attention(q_bad, k.float(), v.float(), check_q=True)
    return errs


@pytest.mark.parametrize("world", worlds(2, 3, 4))
def test_decode_attention_matches_float64(world):
    for per_rank in run_distributed(_errors, world):
        for lengths, e_out, e_lse in per_rank:
            assert e_out <= TOL and e_lse <= TOL, (lengths, e_out, e_lse)


def test_decode_attention_single_process():
    q, k, v = _case(3, (9,), 8, 2, 2)
    ref_out, ref_lse, *_ = reference_attention(q, k, v, torch.zeros_like(q), causal=False)
    out, lse = ringattn.decode_attention(q.float(), k.float(), v.float(), return_lse=True)
    assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL


@pytest.mark.parametrize("q_shape,k_shape,match", [
    ((1, 1, 4, 8), (1, 3, 3, 8), "multiple of the cache's kv_heads"),
    ((1, 1, 4, 8), (2, 3, 2, 8), "differ in batch or head_dim"),
    ((1, 0, 4, 8), (1, 3, 2, 8), "no query tokens"),
    ((1, 4, 8), (1, 3, 2, 8), "must have 4 dims"),
])
def test_decode_attention_errors(q_shape, k_shape, match):
    with pytest.raises(ValueError, match=match):
        ringattn.decode_attention(torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(k_shape))

"""The flash-attn adapter under the device-strict checker: flash-attn's real Python package on
its CPU stand-in (tests/flash_attn_standin.py), the host playing the device.

    python -m tests.device_strict_flash [--every-world] [--plants]   # one JSON summary line

Why not meta: the stand-in plays flash-attn's compiled kernels and needs values (it reads the
varlen bounds as the GPU does), and on meta ``backend="auto"`` never picks flash-attn. So the
checker runs in its host mode (``DeviceStrict("cpu", kernels=[the stand-in])``, see
tests/device_strict.py): real CPU data, one process playing rank r of P through the fake
process group (the received K/V are whatever the buffers held: only the ops are checked, not
the numbers -- tests/flash_attn_checks.py checks those over real groups). Only the stand-in's
own code is allowed to read its arguments on the host, as a CUDA kernel reads them on the GPU;
ringattn's adapter, the strategies around it and flash-attn's Python glue are checked.

Run in its own process (tests/test_device_strict.py does): loading the stand-in makes
``backend="auto"`` pick flash-attn on CPU, which no other test should see.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from tests.device_strict import DeviceStrict, DeviceStrictError, fake_world
from tests.flash_attn_standin import load_flash_attn

STANDIN = os.path.join("tests", "flash_attn_standin.py")
# the code that plays each backend's compiled kernels (allowed to read its arguments on the host)
STANDINS = {"flash_attn": [STANDIN],
            "torch_varlen": [os.path.join("tests", "torch_flash_standin.py"), STANDIN],
            "fa3": [os.path.join("tests", "fa3_standin.py")]}
STRATEGIES = ("ring", "ulysses", "hybrid", "allgather")
LAYOUTS = ("contiguous", "zigzag", "striped", "doc_zigzag")
WORLDS = (2, 4)
SEQLEN = 48
DOCS = [5, 20, 1, 14, 8]
# documents that start 1-5 tokens before a shard or zigzag-chunk boundary at P = 2 and 4:
# with a window, tall one-sided bands (the varlen route with a raised max_seqlen_k)
BOUNDARY_DOCS = [10, 13, 8, 10, 7]
# name -> (document lengths or None, window, causal, sinks, softcap)
MASKS = {
    "causal": (None, (-1, -1), True, False, None),
    "documents": (DOCS, (-1, -1), True, False, None),
    "window_sinks": (None, (5, -1), True, True, None),
    "documents_window_softcap": (DOCS, (4, 2), False, False, 4.0),
    "boundary_window": (BOUNDARY_DOCS, (7, 0), True, False, None),
    "boundary_two_sided": (BOUNDARY_DOCS, (4, 3), False, True, None),
}


def _cu(docs):
    if docs is None:
        return None
    return torch.tensor([0, *itertools.accumulate(docs)], dtype=torch.int32)


def _sp(strategy, layout, backend="flash_attn"):
    import ringattn

    return ringattn.SequenceParallel(strategy, layout, backend=backend,
                                     ulysses_size=2 if strategy == "hybrid" else None)


def step(world, rank, strategy, layout, mask_name, prof=None, backend="flash_attn"):
    """One attention forward + backward with ``backend`` (flash_attn, torch_varlen or fa3, on
    its stand-in) as rank ``rank`` of ``world``, strictly (call inside ``fake_world(rank,
    world)``). -> ops the checker saw."""
    docs, window, causal, use_sinks, softcap = MASKS[mask_name]
    if layout == "doc_zigzag" and docs is None:
        docs = [SEQLEN]  # it places tokens by document
    if backend == "torch_varlen":
        softcap = None  # torch's op has none: an explicit backend would refuse the call
    sp = _sp(strategy, layout, backend)
    gen = torch.Generator().manual_seed(world * 100 + rank)
    s = SEQLEN // world
    q = torch.randn(1, s, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, s, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    sinks = torch.zeros(4, requires_grad=True) if use_sinks else None
    dout = torch.randn(1, s, 4, 16, generator=gen)
    plan = sp.prepare(q.shape[:2], _cu(docs), device=q.device, rules=[(causal, window)])
    with DeviceStrict("cpu", kernels=STANDINS[backend]) as strict:
        if prof is not None:
            with prof:
                out = sp.attention(q, k, v, causal=causal, window_size=window, sinks=sinks,
                                   softcap=softcap, plan=plan)
        else:
            out = sp.attention(q, k, v, causal=causal, window_size=window, sinks=sinks,
                               softcap=softcap, plan=plan)
        out.backward(dout)
    return strict.ops


def cases(every_world):
    """(P, rank, strategy, layout, mask): every combination once, P alternating 2 and 4 and
    the rank rotating over P's ranks; ``every_world``: every combination at both P."""
    combos = list(itertools.product(STRATEGIES, LAYOUTS, MASKS))
    if every_world:
        return [(w, i % w, *c) for w in WORLDS for i, c in enumerate(combos)]
    return [(WORLDS[i % 2], (i // 2) % WORLDS[i % 2], *c) for i, c in enumerate(combos)]


def matrix(every_world=False, backend="flash_attn", only=None):
    """-> (failures, {backend/kind: forward kernel calls}, cases run). ``only``: a predicate on
    (P, rank, strategy, layout, mask) choosing a subset of the cases."""
    from ringattn import profile

    prof = profile.RingProfile()
    failures, runs = [], 0
    for case in cases(every_world):
        if only is not None and not only(*case):
            continue
        with fake_world(case[1], case[0]):
            try:
                ops = step(*case, prof=prof, backend=backend)
                assert ops > 50, f"the strict region saw only {ops} ops"
            except Exception as e:  # noqa: BLE001 - collect every failing case, then report
                failures.append(f"P={case[0]} rank={case[1]} {case[2:]}: {type(e).__name__}: {e}")
            runs += 1
    return failures, {f"{b}/{kind}": n for (b, kind), n in sorted(prof.blocks.items())}, runs


# ---- planted faults inside the adapter: the host mode must catch each ------------------------

def _plants():
    """name -> a wrapper of FlashAttnBackend.forward that adds one fault before the call."""
    from ringattn.kernels import flash

    def bounds_from_python(forward):  # the adapter's own fallback: bounds built from segments
        def run(self, q, k, v, **kw):
            if kw.get("segments") is not None:
                kw["cu_seqlens"] = flash._cu(kw["segments"], None, q.device)
            return forward(self, q, k, v, **kw)
        return run

    def before(fault):
        def wrap(forward):
            def run(self, q, k, v, **kw):
                fault(q)
                return forward(self, q, k, v, **kw)
            return run
        return wrap

    return {
        "item": before(lambda q: float(q.detach().sum())),
        "tolist": before(lambda q: q.detach()[0, :1, 0, 0].tolist()),
        "cpu": before(lambda q: q.detach().cpu()),
        "nonzero": before(lambda q: (q.detach() > 0).nonzero()),
        "mask_index": before(lambda q: q.detach()[q.detach() > 0]),
        "arange_on_host": before(lambda q: torch.arange(q.shape[1])),
        "bounds_from_python": bounds_from_python,
    }


def plants():
    """-> {plant: the checker's message, or None where it passed}, each planted in the
    adapter's forward of a ring step over packed documents (varlen blocks)."""
    from ringattn.kernels.flash import FlashAttnBackend

    caught = {}
    original = FlashAttnBackend.forward
    for name, wrap in _plants().items():
        FlashAttnBackend.forward = wrap(original)
        try:
            with fake_world(1, 2):
                step(2, 1, "ring", "zigzag", "documents")
            caught[name] = None
        except DeviceStrictError as e:
            caught[name] = str(e)
        finally:
            FlashAttnBackend.forward = original
    return caught


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--every-world", action="store_true")
    parser.add_argument("--plants", action="store_true")
    args = parser.parse_args()
    load_flash_attn()
    import importlib.metadata

    summary = {"release": importlib.metadata.version("flash_attn")}
    failures, blocks, runs = matrix(args.every_world)
    summary.update(failures=failures, blocks=blocks, runs=runs)
    if args.plants:
        summary["plants"] = plants()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

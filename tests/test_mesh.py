"""ringattn.init_mesh: the groups it builds honour the timeout it is given."""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

import ringattn
from tests.distributed import run_distributed

TIMEOUT_S = 2.0


def _hung_peer(rank, world):
    """Rank 1 never joins: rank 0's collectives on the mesh's ring and flattened sp groups must
    fail after TIMEOUT_S, not after torch's default for new groups (30 minutes)."""
    mesh = ringattn.init_mesh(sp=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        time.sleep(2 * TIMEOUT_S + 1)  # alive but silent: a hang, not a closed connection
        return None
    waited = {}
    for dim in ("ring", "sp"):
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=mesh[dim].get_group())
        except RuntimeError as e:
            waited[dim] = (time.monotonic() - start, str(e).splitlines()[0])
        else:
            waited[dim] = (time.monotonic() - start, None)
    return waited


def test_mesh_groups_time_out_after_the_given_timeout():
    waited, _ = run_distributed(_hung_peer, 2, timeout=60)
    for dim, (seconds, error) in waited.items():
        assert error is not None, f"{dim}: the collective did not fail"
        assert TIMEOUT_S - 0.5 <= seconds < TIMEOUT_S + 2.5, (dim, seconds, error)

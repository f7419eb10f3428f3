"""ringattn.init_mesh: the groups it builds honour the timeout it is given."""
from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

import ringattn
from tests.distributed import run_distributed, world_and_backend

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


def _group_timeouts(rank, world, device_type):
    timeout = datetime.timedelta(seconds=123)
    mesh = ringattn.init_mesh(sp=world, timeout=timeout, device_type=device_type)
    device = torch.device(device_type)
    return {dim: mesh[dim].get_group()._get_backend(device).options._timeout.total_seconds()
            for dim in ("dp", "ring", "ulysses", "sp")}


@pytest.mark.parametrize("world, backend", world_and_backend([1]))
def test_every_mesh_group_carries_the_timeout(world, backend):
    """The backend options init_mesh builds (gloo's on CPU, NCCL's on CUDA) reach every group."""
    device_type = "cuda" if backend == "nccl" else "cpu"
    timeouts = run_distributed(_group_timeouts, world, device_type, backend=backend, timeout=120)[0]
    assert timeouts == dict.fromkeys(("dp", "ring", "ulysses", "sp"), 123.0)

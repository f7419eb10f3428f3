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


def _old_init_device_mesh(device_type, mesh_shape, *, mesh_dim_names=None):
    """``init_device_mesh`` as torch < 2.9 presents it: no ``backend_override``."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, mesh_shape, mesh_dim_names=mesh_dim_names)


def _fallback_mesh(rank, world, timeout_s, ulysses):
    """init_mesh on a torch whose init_device_mesh lacks backend_override: every group it hands
    out (each dim's and the flattened sp group) carries the timeout and spans the right ranks."""
    import ringattn.mesh as mesh_mod
    from ringattn.mesh import mesh_sp_groups

    mesh_mod.init_device_mesh = _old_init_device_mesh
    assert not mesh_mod._has_backend_override()
    mesh = ringattn.init_mesh(sp=world, ulysses=ulysses, timeout=datetime.timedelta(seconds=timeout_s))
    sp, ring, uly = mesh_sp_groups(mesh)
    groups = {"dp": mesh["dp"].get_group(), "ring": ring, "ulysses": uly, "sp": sp}
    out = {}
    for dim, group in groups.items():
        total = torch.ones(1)
        dist.all_reduce(total, group=group)
        out[dim] = (group._get_backend(torch.device("cpu")).options._timeout.total_seconds(),
                    dist.get_process_group_ranks(group), int(total))
    return out


@pytest.mark.parametrize("ulysses", [1, 2])
def test_mesh_without_backend_override_keeps_the_timeout(ulysses):
    """torch < 2.9 (presented by an init_device_mesh without backend_override): init_mesh builds
    the groups itself; each has the timeout, its ranks, and works."""
    got = run_distributed(_fallback_mesh, 2, 77.0, ulysses, timeout=120)
    ring = [0] if ulysses == 2 else [0, 1]
    uly = [0, 1] if ulysses == 2 else [0]
    assert got[0] == {"dp": (77.0, [0], 1), "ring": (77.0, ring, len(ring)),
                      "ulysses": (77.0, uly, len(uly)), "sp": (77.0, [0, 1], 2)}
    assert got[1]["sp"] == (77.0, [0, 1], 2)


def _recorded_options(rank, world):
    """The options objects init_mesh hands torch for each mesh dim and for the flatten."""
    import ringattn.mesh as mesh_mod
    from torch.distributed.device_mesh import DeviceMesh

    seen = []
    real_init, real_flatten = mesh_mod.init_device_mesh, DeviceMesh._flatten

    def init(*args, backend_override=None, **kw):
        seen.extend(backend_override.values())
        return real_init(*args, backend_override=backend_override, **kw)

    def flatten(self, name=None, backend_override=None):
        seen.append(backend_override)
        return real_flatten(self, name, backend_override=backend_override)

    mesh_mod.init_device_mesh, DeviceMesh._flatten = init, flatten
    ringattn.init_mesh(sp=world, timeout=datetime.timedelta(seconds=55))
    return [(id(opts), backend, opts._timeout.total_seconds()) for backend, opts in seen]


def test_every_group_gets_its_own_options_object():
    """torch writes into the options a group is created with (NCCL: its name, ranks, split colour)
    and the group keeps them: one object shared by the dims and the flatten would end up
    describing only the last group created."""
    seen = run_distributed(_recorded_options, 1, timeout=60)[0]
    assert len(seen) == 4, seen  # dp, ring, ulysses, sp
    assert len({ident for ident, _, _ in seen}) == 4, "an options object is shared between groups"
    assert {(backend, t) for _, backend, t in seen} == {("gloo", 55.0)}

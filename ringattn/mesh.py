"""Data-parallel x sequence-parallel device meshes, and the process groups strategies use.

    mesh = ringattn.init_mesh(dp=2, sp=4, ulysses=2)   # world of 8
    sp = ringattn.SequenceParallel("hybrid", mesh=mesh)

The mesh has dims ("dp", "ring", "ulysses"), row-major over global ranks: the u Ulysses
ranks are consecutive (intra-node), a ring's ranks are u apart, and each data-parallel
replica is sp consecutive ranks. ("ring", "ulysses") flattened is the "sp" dim; with
ulysses=1 the ring is the whole sp dim.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm import group_size


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _default_device_type() -> str:
    if dist.is_available() and dist.is_initialized():
        return "cuda" if dist.get_backend() == "nccl" else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_mesh(*, dp: int | None = None, sp: int | None = None, ulysses: int = 1,
              device_type: str | None = None, timeout: datetime.timedelta | None = None) -> DeviceMesh:
    """A (dp, ring, ulysses) device mesh with its ("ring", "ulysses") dims flattened to "sp".

    dp defaults to world // sp, sp to world // dp (the whole world when neither is
    given); dp * sp must equal the world size and ulysses must divide sp. Sizes are
    checked before any communication. device_type: "cuda" (NCCL) or "cpu" (gloo);
    default from the initialised backend. timeout: how long a collective of the mesh's
    groups may wait for a peer; None: torch's default for new groups (which is NOT the
    timeout given to ``init_process_group``).
    """
    world = _world_size()
    for name, value in (("dp", dp), ("sp", sp), ("ulysses", ulysses)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"init_mesh: {name} must be a positive int; got {value!r}")
    if sp is None:
        sp = world // dp if dp is not None else world
    if dp is None:
        dp = world // sp
    if dp * sp != world:
        raise ValueError(f"init_mesh: dp ({dp}) x sp ({sp}) = {dp * sp} must equal the world size ({world})")
    if sp % ulysses:
        raise ValueError(f"init_mesh: ulysses ({ulysses}) must divide sp ({sp})")
    device_type = device_type or _default_device_type()
    override = _timeout_options(device_type, timeout)
    names = ("dp", "ring", "ulysses")
    mesh = init_device_mesh(device_type, (dp, sp // ulysses, ulysses), mesh_dim_names=names,
                            backend_override=None if override is None else dict.fromkeys(names, override))
    # A private but stable call (torchtitan builds its meshes the same way); the flattened
    # mesh is cached on the root, so later calls return the same groups.
    mesh["ring", "ulysses"]._flatten("sp", backend_override=override)
    return mesh


def _timeout_options(device_type: str, timeout: datetime.timedelta | None):
    """(backend, options) that give every group of a mesh ``timeout``: DeviceMesh creates its
    groups with torch's default timeout unless the options carry one."""
    if timeout is None:
        return None
    if device_type == "cuda":
        backend, options = "nccl", dist.ProcessGroupNCCL.Options()
    else:
        backend, options = "gloo", dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return backend, options


def mesh_sp_sizes(mesh: DeviceMesh) -> tuple[int, int | None]:
    """(sp size, Ulysses dim size or None if the mesh has no "ring"/"ulysses" dims). No communication."""
    names = mesh.mesh_dim_names or ()
    if "ring" in names and "ulysses" in names:
        return mesh["ring"].size() * mesh["ulysses"].size(), mesh["ulysses"].size()
    if "sp" in names:
        return (mesh.size() if names == ("sp",) else mesh["sp"].size()), None
    if mesh.ndim == 1:
        return mesh.size(), None
    raise ValueError(
        f"a sequence-parallel mesh needs an 'sp' dim or 'ring' and 'ulysses' dims, or must be "
        f"1-D; got dims {names or None} of shape {tuple(mesh.shape)}"
    )


def mesh_sp_groups(mesh: DeviceMesh):
    """(sp group, ring group, ulysses group) of a mesh from ``init_mesh`` or its SP
    sub-mesh ``mesh["ring", "ulysses"]``; ring and Ulysses groups are None for a mesh
    without those dims (e.g. a 1-D "sp" mesh)."""
    names = mesh.mesh_dim_names or ()
    if "ring" in names and "ulysses" in names:
        sub = mesh["ring", "ulysses"] if names != ("ring", "ulysses") else mesh
        return sub._flatten("sp").get_group(), sub["ring"].get_group(), sub["ulysses"].get_group()
    if "sp" in names and names != ("sp",):
        return mesh["sp"].get_group(), None, None
    return mesh.get_group(), None, None


def split_hybrid_groups(group, ulysses_size: int):
    """(ring group, Ulysses group) of this rank inside a sequence-parallel ``group``.

    Ulysses groups: u consecutive group ranks; rings: the ranks u apart. Only the
    members of each new group take part in creating it (``use_local_synchronization``),
    so this works when several data-parallel replicas each split their own group.
    """
    if group_size(group) == 1:
        return group, group
    ranks = [dist.get_global_rank(group or dist.group.WORLD, i)
             for i in range(dist.get_world_size(group))]
    me = dist.get_rank(group)
    start = me - me % ulysses_size
    uly = dist.new_group(ranks[start:start + ulysses_size], use_local_synchronization=True)
    ring = dist.new_group(ranks[me % ulysses_size::ulysses_size], use_local_synchronization=True)
    return ring, uly

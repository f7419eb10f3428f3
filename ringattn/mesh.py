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
import inspect
import math
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
    names = ("dp", "ring", "ulysses")
    shape = (dp, sp // ulysses, ulysses)
    if not _has_backend_override():
        return _mesh_from_own_groups(device_type, shape, names, timeout)
    # One options object per group: torch writes into the options a group is created with
    # (NCCL: the group's name, its ranks, the split source and colour) and the group keeps a
    # reference to them, so options shared by two groups end up describing the last one.
    override = {name: _timeout_options(device_type, timeout) for name in names}
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names,
                            backend_override=None if timeout is None else override)
    # A private but stable call (torchtitan builds its meshes the same way); the flattened
    # mesh is cached on the root, so later calls return the same groups.
    mesh["ring", "ulysses"]._flatten("sp", backend_override=_timeout_options(device_type, timeout))
    return mesh


def _has_backend_override() -> bool:
    """Whether this torch's ``init_device_mesh`` takes per-dimension backends and options
    (torch >= 2.9); before it, a mesh's groups got torch's default timeout for new groups."""
    return "backend_override" in inspect.signature(init_device_mesh).parameters


# SP groups built by ``_mesh_from_own_groups``, by the global ranks of the SP sub-mesh they
# span: without ``backend_override`` a flattened dim cannot be given a timeout, so the "sp"
# group is made here and looked up by ``mesh_sp_groups`` instead of ``_flatten("sp")``.
_OWN_SP_GROUPS: dict[tuple[int, ...], object] = {}


def _mesh_from_own_groups(device_type: str, shape: tuple[int, int, int], names: tuple[str, ...],
                          timeout: datetime.timedelta | None) -> DeviceMesh:
    """The same (dp, ring, ulysses) mesh for a torch without ``backend_override``: every group
    (each dim's, and the flattened sp one) created with ``new_group`` and the timeout, then
    assembled with the public ``DeviceMesh.from_group``. Every rank creates every group, in
    the same order, as ``new_group`` requires."""
    ranks = torch.arange(math.prod(shape), device="cpu").view(shape)
    me = dist.get_rank()
    backend = "nccl" if device_type == "cuda" else "gloo"

    def groups_along(grid: torch.Tensor, dims: tuple[int, ...]):
        """this rank's group among those spanning ``dims`` of ``grid``"""
        rest = [d for d in range(grid.ndim) if d not in dims]
        rows = grid.permute(*rest, *dims).reshape(-1, math.prod(grid.shape[d] for d in dims))
        mine = None
        for row in rows.tolist():
            group = dist.new_group(row, timeout=timeout, backend=backend,
                                   pg_options=_timeout_options(device_type, timeout))
            if me in row:
                mine = group
        return mine

    dim_groups = [groups_along(ranks, (d,)) for d in range(len(shape))]
    sp_group = groups_along(ranks, (1, 2))
    mesh = DeviceMesh.from_group(dim_groups, device_type, mesh=ranks, mesh_dim_names=names)
    sp_ranks = tuple(ranks[ranks.eq(me).nonzero()[0, 0]].flatten().tolist())
    _OWN_SP_GROUPS[sp_ranks] = sp_group
    return mesh


def _timeout_options(device_type: str, timeout: datetime.timedelta | None):
    """A new (backend, options) pair that gives a group ``timeout`` (DeviceMesh creates its
    groups with torch's default timeout unless the options carry one); None without a timeout."""
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
        sp = _OWN_SP_GROUPS.get(tuple(sub.mesh.flatten().tolist()))
        if sp is None:
            sp = sub._flatten("sp").get_group()
        return sp, sub["ring"].get_group(), sub["ulysses"].get_group()
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

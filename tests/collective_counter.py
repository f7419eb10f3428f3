"""Run ``recipes.train`` (its argv: Hydra overrides) counting the collectives of its training
steps; a test helper, started by torchrun as a script.

Every torch.distributed collective is wrapped (in this process only) so that calls made inside
the DeepSpeed engine's forward, backward and step -- the model's attention, its plan, and
DeepSpeed's gradient reduction -- are counted by kind. Each rank writes its counts as JSON to
``$COLLECTIVE_COUNTS.rank<R>`` at exit.
"""
import atexit
import collections
import functools
import json
import os
import runpy
import sys

import torch.distributed as dist

# isend/irecv stay unwrapped: P2POp checks its op is exactly dist.isend / dist.irecv
P2P = ("batch_isend_irecv", "send", "recv")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "all_to_all_single", "all_to_all", "reduce_scatter_tensor",
               "reduce_scatter", "reduce", "gather", "scatter", "barrier")
counts: collections.Counter = collections.Counter()
depth = [0]  # > 0 while inside an engine forward / backward / step


def _counted(name, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if depth[0]:
            counts[name] += 1
        return fn(*args, **kwargs)
    return call


def _inside(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
    return call


for _name in COLLECTIVES + P2P:
    if hasattr(dist, _name):
        setattr(dist, _name, _counted(_name, getattr(dist, _name)))

from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

for _method in ("forward", "backward", "step"):
    setattr(DeepSpeedEngine, _method, _inside(getattr(DeepSpeedEngine, _method)))


@atexit.register
def _write():
    with open(f"{os.environ['COLLECTIVE_COUNTS']}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(dict(counts), f)


sys.argv = ["recipes.train", *sys.argv[1:]]
runpy.run_module("recipes.train", run_name="__main__", alter_sys=True)

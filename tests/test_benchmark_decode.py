"""recipes/benchmarks/decode.py runs at P = 1 and 2 and reports what the README table shows:
the KV cache per rank halves at P = 2, and the decode all-reduces carry a fixed number of
bytes per token (2 per layer, independent of the cache length)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train_launch import REPO, clean_env

SMALL = ["cache=64", "tokens=2", "dim=32", "n_heads=4", "n_kv_heads=2"]


def _bench(tmp_path, nproc):
    out = tmp_path / f"p{nproc}.json"
    args = ["-m", "recipes.benchmarks.decode", *SMALL, f"output={out}"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # the benchmark end to end, one process and two under torchrun
def test_decode_benchmark_cache_per_rank_and_bytes(tmp_path):
    one, two = _bench(tmp_path, 1), _bench(tmp_path, 2)
    # 2 layers x (K and V) x 64 tokens x 2 kv heads x head_dim 8 x 4 bytes
    assert one["kv_cache_mib_per_rank"] * 2**20 == 2 * 2 * 64 * 2 * 8 * 4
    assert two["kv_cache_mib_per_rank"] == one["kv_cache_mib_per_rank"] / 2
    # per layer: max of (1 x 4 heads) lse + sum of (4 heads x (8 + 1)) fp32 values
    assert one["decode_allreduce_bytes_per_token"] == 0
    assert two["decode_allreduce_bytes_per_token"] == 2 * (4 * (1 + 8 + 1)) * 4
    assert two["prefill_s"] > 0 and two["decode_ms_per_token"] > 0

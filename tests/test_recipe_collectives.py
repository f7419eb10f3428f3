"""The recipe's training step: its non-P2P collectives do not depend on the model's depth.

The recipe runs under torchrun with every torch.distributed collective counted inside the
DeepSpeed engine's forward, backward and step (tests/collective_counter.py): the attention
plan's one validation all-gather per forward, DeepSpeed's gradient reduction, and nothing per
layer. The ring's P2P transfers do grow with depth (they carry each layer's K/V), which shows
the counter sees the attention at all.
"""
import json
import subprocess
import sys

import pytest

from tests.train_launch import FAST, REPO, clean_env


def _counts(tmp_path, n_layers, extra):
    out = tmp_path / f"counts_L{n_layers}"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(REPO / "tests" / "collective_counter.py"), *FAST, "parallel.sp_size=2", "trainer.max_steps=2",
            f"model.n_layers={n_layers}", "model.activation_checkpointing=true", *extra,
            f"hydra.run.dir={tmp_path / f'run_L{n_layers}'}"]
    proc = subprocess.run(args, cwd=REPO, env=clean_env({"COLLECTIVE_COUNTS": str(out)}), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return [json.loads((tmp_path / f"counts_L{n_layers}.rank{r}").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["parallel.ulysses_size=2"]], ids=["ring", "ulysses"])
def test_recipe_step_collectives_do_not_depend_on_depth(tmp_path, extra):
    shallow, deep = _counts(tmp_path, 2, extra), _counts(tmp_path, 4, extra)
    p2p = {"batch_isend_irecv", "send", "recv"}
    per_layer = {"all_to_all_single", "all_to_all"}  # Ulysses' own data movement, per layer by design
    for rank in range(2):
        fixed = lambda c: {k: v for k, v in c.items() if k not in p2p | per_layer}  # noqa: E731
        assert fixed(shallow[rank]) == fixed(deep[rank]), (rank, shallow[rank], deep[rank])
        # one plan all-gather per model forward: 2 training steps + the final evaluation
        assert shallow[rank].get("all_gather", 0) >= 3, shallow[rank]
        moved = sum(v for k, v in deep[rank].items() if k in p2p | per_layer)
        assert moved > sum(v for k, v in shallow[rank].items() if k in p2p | per_layer), (shallow[rank], deep[rank])

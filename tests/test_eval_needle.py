"""eval_needle's task format follows the checkpoint, and its samples are the training task's.
(End to end on a trained model, teacher-forced vs generated: tests/test_hf.py,
test_needle_finds_passkey_after_recipe_training.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recipes.data import IGNORE_INDEX, PasskeyTask
from recipes.eval_needle import NeedleJob, passkey_sample, run, task_format
from recipes.models import HFModelConfig


def test_task_format_defaults_to_the_checkpoints():
    saved = OmegaConf.create({"data": {"kind": "passkey", "passkey_digits": 1, "seq_len": 128}})
    job = task_format(NeedleJob(), saved)
    assert (job.task, job.passkey_digits, job.lengths) == ("passkey", 1, [128, 256, 512])
    job = task_format(NeedleJob(passkey_digits=3, lengths=[64], task="text"), saved)  # explicit wins
    assert (job.task, job.passkey_digits, job.lengths) == ("text", 3, [64])
    job = task_format(NeedleJob(), None)  # no checkpoint (an HF model): the old defaults
    assert (job.task, job.passkey_digits, job.lengths) == ("passkey", 2, [256, 512])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_sample_places_the_needle_at_the_depth(depth):
    tokens, labels = passkey_sample(64, depth, 2, np.random.Generator(np.random.PCG64(0)))
    at = PasskeyTask.needle_at(depth, 64, 2)
    assert tokens[at] == PasskeyTask.KEY and tokens[64 - 2] == PasskeyTask.QUERY
    assert torch.equal(labels[62:], tokens[at + 1:at + 3]) and (labels[:62] == IGNORE_INDEX).all()
    if depth == 1.0:
        assert at + 2 == 64 - 2 - 1  # the needle's last digit right before the query marker


def test_bad_mode_and_hf_generation_are_refused():
    with pytest.raises(Exception, match="beam"):  # the typed field, checked when Hydra composes
        OmegaConf.merge(OmegaConf.structured(NeedleJob), {"mode": "beam"})
    with pytest.raises(ValueError, match="mode=generate needs our Llama"):
        run(NeedleJob(model=HFModelConfig(path="/nonexistent"), mode="generate"), "/tmp", {})

"""Checkpoint housekeeping without processes: retention after a save (what is kept, deleted or
renamed aside), on checkpoint directories made by hand with real manifests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from recipes import checkpoint
from tests.train_launch import metrics, tail, train_ok


def _ckpt(run_dir: Path, step: int, universal: bool = False) -> Path:
    """A committed checkpoint: two files and a manifest of their sizes and checksums."""
    d = run_dir / checkpoint.DIRNAME / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"m" * 100)
    (d / "meta.json").write_text(f'{{"step": {step}}}')
    names = checkpoint._files(str(d))
    checkpoint._write_json(str(d / checkpoint.MANIFEST),
                           {"step": step, "files": checkpoint._digest_share(str(d), names, 0, 1)})
    if universal:
        (d / checkpoint.UNIVERSAL).mkdir()
        (d / checkpoint.UNIVERSAL / "fp32.pt").write_bytes(b"u" * 100)
    return d


def _truncate(d: Path) -> None:
    (d / "model.pt").write_bytes(b"m" * 10)


def _listing(run_dir: Path) -> list:
    return sorted(p.name for p in (run_dir / checkpoint.DIRNAME).iterdir())


def test_fallback_then_save_keeps_the_new_checkpoint_and_renames_the_corrupt_newer_one_aside(tmp_path):
    """A resume fell back from a corrupt step_300 to step_200 and then saved step_250: with
    keep=1 the one just written stays, 300 is renamed aside (not counted, not deleted), 200 goes."""
    _ckpt(tmp_path, 200)
    _truncate(_ckpt(tmp_path, 300))
    written = _ckpt(tmp_path, 250)
    checkpoint.retain(str(tmp_path), str(written), keep=1)
    assert _listing(tmp_path) == ["corrupt-step_00000300", "step_00000250"]
    assert checkpoint.latest_complete(str(tmp_path)) == str(written)


def test_a_complete_newer_checkpoint_is_renamed_aside_as_superseded(tmp_path):
    """A newer complete step_N (a replaced trajectory) would win the next resume over the one just
    written: it is renamed aside too, under a name that does not call it corrupt."""
    _ckpt(tmp_path, 300)
    written = _ckpt(tmp_path, 250)
    checkpoint.retain(str(tmp_path), str(written), keep=2)
    assert _listing(tmp_path) == ["step_00000250", "superseded-step_00000300"]


def test_only_complete_checkpoints_count_and_incomplete_older_ones_are_renamed_aside(tmp_path):
    _ckpt(tmp_path, 100)
    _truncate(_ckpt(tmp_path, 200))
    written = _ckpt(tmp_path, 300)
    checkpoint.retain(str(tmp_path), str(written), keep=2)
    # 200 is incomplete: it does not take the second place, 100 does
    assert _listing(tmp_path) == ["corrupt-step_00000200", "step_00000100", "step_00000300"]


def test_a_universal_copy_counts_as_one_more_checkpoint_and_goes_first(tmp_path):
    _ckpt(tmp_path, 100)
    _ckpt(tmp_path, 200, universal=True)
    written = _ckpt(tmp_path, 300)
    checkpoint.retain(str(tmp_path), str(written), keep=2)
    # 300 + 200 fill the two places; 200's universal copy would be a third: it goes, then 100
    assert _listing(tmp_path) == ["step_00000200", "step_00000300"]
    assert not (tmp_path / checkpoint.DIRNAME / "step_00000200" / checkpoint.UNIVERSAL).exists()

    _ckpt(tmp_path, 400)
    (tmp_path / checkpoint.DIRNAME / "step_00000300" / checkpoint.UNIVERSAL).mkdir()
    checkpoint.retain(str(tmp_path), str(tmp_path / checkpoint.DIRNAME / "step_00000400"), keep=3)
    # 400, 300 and 300's universal copy are three copies: 200 goes
    assert _listing(tmp_path) == ["step_00000300", "step_00000400"]
    assert (tmp_path / checkpoint.DIRNAME / "step_00000300" / checkpoint.UNIVERSAL).is_dir()


def test_keep_0_deletes_nothing_but_still_renames_newer_corrupt_ones_aside(tmp_path):
    for s in (100, 200):
        _ckpt(tmp_path, s, universal=True)
    _truncate(_ckpt(tmp_path, 400))
    written = _ckpt(tmp_path, 300)
    checkpoint.retain(str(tmp_path), str(written), keep=0)
    assert _listing(tmp_path) == ["corrupt-step_00000400", "step_00000100", "step_00000200", "step_00000300"]
    _truncate(_ckpt(tmp_path, 400))  # the same step corrupt again: the earlier one is not overwritten
    checkpoint.retain(str(tmp_path), str(written), keep=0)
    assert "corrupt-step_00000400.1" in _listing(tmp_path)


@pytest.mark.slow
def test_resume_past_a_corrupt_checkpoint_then_save_with_keep_1_stays_resumable(tmp_path):
    """The recipe end to end, one process: checkpoints 2 and 4, then 4's model file is cut in
    half. The next invocation falls back to 2, saves 3 (stop_at_step) with keep_checkpoints=1 and
    stops; the one after that resumes from 3 -- before, retention deleted 3 and 2 by step number
    and kept the corrupt 4, so nothing was left to resume."""
    train_ok(tmp_path, 1, ["trainer.max_steps=4", "trainer.save_every=2"])
    states = tmp_path / checkpoint.DIRNAME / "step_00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    over = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_checkpoints=1"]
    proc = train_ok(tmp_path, 1, over + ["trainer.stop_at_step=3"])
    assert "falling back" in proc.stderr, tail(proc)
    assert _listing(tmp_path) == ["corrupt-step_00000004", "step_00000003"], tail(proc)
    proc = train_ok(tmp_path, 1, over)
    assert "at step 3" in proc.stderr and "falling back" not in proc.stderr, tail(proc)
    assert _listing(tmp_path) == ["corrupt-step_00000004", "step_00000006"]
    assert sorted(metrics(tmp_path)) == list(range(1, 7))


# ---- which changes a resume accepts ----

def _facts(**model_options):
    from recipes.data import DataConfig
    from recipes.models import LlamaModel
    from recipes.train import JobConfig, _facts
    from ringattn.models import LlamaConfig

    return _facts(JobConfig(data=DataConfig()), LlamaModel(LlamaConfig(vocab_size=64, **model_options)))


def test_a_resume_accepts_memory_options_and_refuses_what_changes_the_weights_meaning(tmp_path):
    """Checkpointing, offload and tiling change what is kept in memory, not the result: the
    natural move when a run resumes on fewer GPUs. A width, head count or RoPE base does change it."""
    saved = _facts()
    for option in ({"activation_checkpointing": True}, {"activation_checkpointing": True, "offload_activations": True},
                   {"tiled_loss": False},
                   {"loss_tile_tokens": 16}, {"tiled_mlp": True, "mlp_tile_tokens": 8}):
        checkpoint.check_compatible("ckpt", saved, _facts(**option))  # no error
    for option, named in (({"dim": 64}, "model.dim"), ({"n_heads": 2}, "model.n_heads"),
                          ({"rope_theta": 5e5}, "model.rope_theta"), ({"n_layers": 3}, "shape.params")):
        with pytest.raises(checkpoint.CheckpointError, match=f"incompatible.*{named}"):
            checkpoint.check_compatible("ckpt", saved, _facts(**option))


def test_facts_a_checkpoint_did_not_record_are_not_compared():
    """A checkpoint written before the shape was a fact, with every model option in its record:
    the options that are no longer facts and the missing shape do not refuse it."""
    now = _facts(activation_checkpointing=True)
    older = {k: v for k, v in _facts().items() if k != "shape"}
    older["model"] = dict(older["model"], activation_checkpointing=False, tiled_mlp=False)
    checkpoint.check_compatible("ckpt", older, now)
    with pytest.raises(checkpoint.CheckpointError, match="seed: checkpoint 1 vs now 0"):
        checkpoint.check_compatible("ckpt", dict(older, seed=1), now)


def test_the_options_a_resume_ignores_are_fields_of_the_model_configs():
    """Renaming one of them would silently make it a fact again (or a typo never one)."""
    import dataclasses

    from recipes.models import HFModelConfig
    from recipes.train import _NOT_FACTS
    from ringattn.models import LlamaConfig

    fields = {f.name for cls in (LlamaConfig, HFModelConfig) for f in dataclasses.fields(cls)}
    assert set(_NOT_FACTS) <= fields, set(_NOT_FACTS) - fields


# ---- housekeeping: one process plays rank 0 (and rank 1) with a stand-in for torch.distributed ----

class _OneRank:
    """torch.distributed for a world of one: barriers pass, a gather holds this rank's object."""

    class distributed_c10d:
        _store = None

        @classmethod
        def _get_default_store(cls):
            import torch.distributed as dist

            cls._store = cls._store or dist.HashStore()
            return cls._store

    @staticmethod
    def barrier():
        pass

    @staticmethod
    def all_gather_object(out, obj):
        out[0] = obj

    @staticmethod
    def broadcast_object_list(box, src):
        pass


class _Engine:
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag))
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"w" * 64)


def test_a_save_removes_temporaries_left_by_crashed_saves(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "dist", _OneRank)
    ck = tmp_path / checkpoint.DIRNAME
    for stale in (".tmp-step_00000003", ".tmp-step_00000009"):  # two saves that crashed, at other steps
        (ck / stale).mkdir(parents=True)
        (ck / stale / "mp_rank_00_model_states.pt").write_bytes(b"half")
    checkpoint.save(_Engine(), str(tmp_path), 5, {"zero_stage": 0}, rank=0, world=1, keep=2)
    assert _listing(tmp_path) == ["step_00000005"]
    assert checkpoint.latest_complete(str(tmp_path)) == str(ck / "step_00000005")


def test_ranks_above_0_take_rank_0s_listing_and_never_list_the_checkpoint_directory(tmp_path, monkeypatch):
    """On a shared file system each client may see another listing (NFS caches them): rank 0
    lists, reads meta.json, and every rank decides from what it broadcast."""
    monkeypatch.setattr(checkpoint, "dist", _OneRank)
    d = _ckpt(tmp_path, 8)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")  # not in the manifest: listed only
    sent = []
    monkeypatch.setattr(checkpoint, "_broadcast", lambda obj: sent.append(obj) or obj)
    found0 = checkpoint.find_resumable(str(tmp_path), {"step": 8}, rank=0, world=1)
    assert found0.path == str(d) and found0.meta == {"step": 8}

    received = iter(sent)
    monkeypatch.setattr(checkpoint, "_broadcast", lambda obj: next(received))
    real_listdir, real_open = os.listdir, open

    def listdir(path="."):
        if str(tmp_path) in os.fspath(path):
            raise AssertionError(f"rank 1 listed {path}")
        return real_listdir(path)

    def no_meta(path, *a, **kw):
        assert not os.fspath(path).endswith("meta.json"), "rank 1 read meta.json itself"
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr("builtins.open", no_meta)
    found1 = checkpoint.find_resumable(str(tmp_path), {"step": 8}, rank=1, world=1)
    assert found1 == found0
    # the universal decision uses the broadcast listing (optimizer shards: ZeRO >= 1)
    assert checkpoint.needs_universal(found1.path, {"world_size": 2, "zero_stage": 2}, 1, 2, files=found1.files)


def test_latest_universal_names_the_converted_folder_after_the_rename(tmp_path, monkeypatch):
    """DeepSpeed's ds_to_universal (deepspeed/checkpoint/ds_to_universal.py, main(): "Update
    latest to output folder", 0.19.8) writes <parent of its output>/latest_universal holding the
    output folder's name -- the temporary one. Checked on the one-pass fallback (a checkpoint
    layout recipes.convert does not cut into units), with main stood in for; the unit path
    and the real converter run in tests/test_convert.py."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    from recipes import convert

    def one_pass(args: argparse.Namespace):
        os.makedirs(args.output_folder)
        parent, name = os.path.split(args.output_folder)
        with open(os.path.join(parent, "latest_universal"), "w") as f:
            f.write(name)

    monkeypatch.setattr(convert, "_job", lambda ds, path, tmp: None)
    monkeypatch.setattr(ds_to_universal, "main", one_pass)
    d = _ckpt(tmp_path, 4)
    out = convert.convert(str(d))
    assert out == str(d / checkpoint.UNIVERSAL) and os.path.isdir(out)
    assert (d / "latest_universal").read_text() == checkpoint.UNIVERSAL
    assert (d / (d / "latest_universal").read_text()).is_dir()

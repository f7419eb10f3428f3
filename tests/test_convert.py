"""recipes.convert: DeepSpeed's universal conversion cut into journaled units, run in parallel,
continued after an interruption -- and file for file what ``ds_to_universal.main`` writes.

The checkpoints are real: DeepSpeed engines of 2 gloo ranks at ZeRO-2 and ZeRO-3, one AdamW
step, ``save_checkpoint``; then DeepSpeed's own ``main`` and ours convert the same checkpoint
and every tensor of every file must be equal.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed


def _save_checkpoint(rank, world, stage, out):
    import deepspeed
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    set_accelerator(CPU_Accelerator())  # as recipes.distributed does on CPU
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets them
    torch.manual_seed(0)
    # 3 parameters of odd sizes, so ZeRO's partitions split them part way; one gets no gradient
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(7, 5), "b": torch.nn.Linear(5, 3, bias=False),
                                 "unused": torch.nn.Linear(2, 2, bias=False)})
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(rank))
    loss = model["b"](model["a"](x)).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag="step_00000001")


def _tensors(obj, prefix=""):
    """Every tensor and plain value of a loaded checkpoint file, by path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _assert_same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(str(f).startswith("zero/") for f in files_a), files_a
    for f in files_a:
        if f.suffix != ".pt":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
            continue
        got = dict(_tensors(torch.load(a / f, weights_only=False)))
        want = dict(_tensors(torch.load(b / f, weights_only=False)))
        assert got.keys() == want.keys(), f
        for k in got:
            if torch.is_tensor(want[k]):
                assert torch.equal(got[k], want[k]), (f, k)
            elif not callable(want[k]):
                assert got[k] == want[k] or repr(got[k]) == repr(want[k]), (f, k)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def checkpoint_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ds{request.param}")
    run_distributed(_save_checkpoint, 2, request.param, str(root), timeout=90)
    return root / "step_00000001"


def _reference(step: Path, tmp: Path) -> Path:
    from deepspeed.checkpoint import ds_to_universal

    ref = tmp / "reference"
    ds_to_universal.main(argparse.Namespace(input_folder=str(step), output_folder=str(ref), num_extract_workers=1,
                                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                                            inject_missing_state=True))
    return ref


@pytest.mark.slow
def test_the_units_write_what_deepspeeds_converter_writes(checkpoint_dir, tmp_path):
    step = tmp_path / "step_00000001"
    shutil.copytree(checkpoint_dir, step)
    ref = _reference(checkpoint_dir, tmp_path)
    from recipes import convert

    out = Path(convert.convert(str(step), workers=2))  # the forked pool
    assert out == step / "universal" and not (step / convert.TMP).exists()
    assert (step / "latest_universal").read_text() == "universal"
    _assert_same_tree(out, ref)


@pytest.mark.slow
def test_an_interrupted_conversion_continues_with_the_units_not_done(checkpoint_dir, tmp_path, monkeypatch, caplog):
    from deepspeed.checkpoint import ds_to_universal as ds

    from recipes import convert

    step = tmp_path / "step_00000001"
    shutil.copytree(checkpoint_dir, step)
    ref = _reference(checkpoint_dir, tmp_path)
    merge = "merge_zero3_slices" if (checkpoint_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists() \
        else "merge_tp_slices"
    real, calls = getattr(ds, merge), []

    def dies_on_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("node lost (injected)")
        return real(*args)

    monkeypatch.setattr(ds, merge, dies_on_the_second)
    with pytest.raises(OSError, match="node lost"):
        convert.convert(str(step), workers=1)
    journal = (step / convert.TMP / convert.JOURNAL).read_text().splitlines()
    assert [u for u in journal if u.startswith("extract")] == ["extract dp 0", "extract dp 1"], journal
    assert len([u for u in journal if u.startswith("merge")]) == 1, journal
    assert not (step / "universal").exists()

    # an attempt that died while finishing had copied model-state files into the temporary
    # folder, which DeepSpeed's checkpoint listing (it walks subfolders) would count twice
    for f in checkpoint_dir.glob("*model_states.pt"):
        shutil.copy2(f, step / convert.TMP)
    monkeypatch.setattr(ds, merge, real)
    extracted = []
    monkeypatch.setattr(ds, "extract_zero_shards", lambda *a: extracted.append(a))
    monkeypatch.setattr(ds, "extract_zero_shards_stage3", lambda *a: extracted.append(a))
    with caplog.at_level("INFO", logger="recipes.convert"):
        convert.convert(str(step), workers=1)
    assert extracted == [], "a journaled unit ran again"
    assert "3 of " in caplog.text and "units were done before" in caplog.text, caplog.text
    _assert_same_tree(step / "universal", ref)


def test_the_command_converts_a_run_dirs_newest_checkpoint_and_checks_its_arguments(tmp_path, monkeypatch, capsys):
    from recipes import convert

    got = []
    monkeypatch.setattr(convert, "convert", lambda path, workers: got.append((path, workers)))
    monkeypatch.setattr("recipes.checkpoint.latest_complete", lambda run_dir: os.path.join(run_dir, "step_7"))
    assert convert.main([str(tmp_path / "run"), "--workers", "3"]) == 0
    assert convert.main([str(tmp_path / "run" / "checkpoints" / "step_00000002") + "/"]) == 0
    assert got == [(str(tmp_path / "run" / "step_7"), 3),
                   (str(tmp_path / "run" / "checkpoints" / "step_00000002"), convert.default_workers())]
    monkeypatch.setattr("recipes.checkpoint.latest_complete", lambda run_dir: None)
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / "empty")])
    assert "no complete checkpoint found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / "step_00000001"), "--workers", "0"])

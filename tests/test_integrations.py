"""ringattn.integrations: batch preparation (one process) and the two example loops end to end.

End to end (CPU, gloo, fp32, the examples' tiny Llama, 5 optimizer steps): the per-step
training losses of transformers' Trainer with ``SequenceParallelMixin`` at sp=2 over two
processes equal those of the *stock* Trainer in one process (transformers' own attention and
loss, no ringattn) within 1e-4 -- chunked sequences and DataCollatorWithFlattening packing,
gradient accumulation 2, DDP and DeepSpeed ZeRO-2, and TRL's SFTTrainer (padding-free);
likewise the accelerate loop at sp=2 vs the same loop without ringattn. Tolerance: fp32 runs of the same math in a different
summation order agree to ~1e-6 here (measured); 1e-4 is the required bound, far below a
real error (a wrong loss scale or a lost document boundary moves step 1 by >1e-3).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ringattn import SequenceParallel
from ringattn.integrations.batch import IGNORE_INDEX, count_targets, shard_batch, shift_labels
from tests.train_launch import REPO, clean_env

TOL = 1e-4


# ---------------------------------------------------------------- batch preparation (one process)

def test_shift_labels_on_full_sequence():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX, 9]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]


def test_packed_position_ids_become_cu_seqlens_and_pad_is_a_document():
    # DataCollatorWithFlattening: 3 documents of 3, 2, 2 tokens (7: zigzag over 1 rank needs even)
    ids = torch.arange(1, 8).view(1, 7)
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, 7]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    shard = shard_batch({"input_ids": ids, "labels": labels, "position_ids": pos},
                        SequenceParallel("ring", "zigzag"))
    assert shard.cu_seqlens.dtype == torch.int32
    assert shard.cu_seqlens.tolist() == [0, 3, 5, 7, 8]  # the pad token is its own document
    assert shard.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    # a document's last token has no target (the next document's first label is -100)
    assert shard.labels.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]]
    assert count_targets([{"input_ids": ids, "labels": labels, "position_ids": pos}]).item() == 4


def test_document_layout_gets_one_document_for_an_unpacked_row():
    ids = torch.arange(6).view(1, 6)
    shard = shard_batch({"input_ids": ids, "labels": ids.clone()}, SequenceParallel("ring", "doc_zigzag"))
    assert shard.cu_seqlens.tolist() == [0, 6] and shard.labels.tolist() == [[1, 2, 3, 4, 5, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="needs batch size 1"):
        shard_batch({"input_ids": ids.view(2, 3), "labels": ids.view(2, 3)}, SequenceParallel("ring", "doc_zigzag"))


def test_unpacked_batch_padded_at_the_end_without_documents():
    ids = torch.arange(10).view(2, 5)
    shard = shard_batch({"input_ids": ids, "labels": ids.clone()}, SequenceParallel("ring", "zigzag"))
    assert shard.cu_seqlens is None
    assert shard.position_ids.tolist() == [list(range(6))] * 2
    assert shard.labels[:, 4:].eq(IGNORE_INDEX).all() and shard.labels[:, :4].tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]


def test_right_padding_is_exact_and_masked_out():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}
    shard = shard_batch(batch, SequenceParallel("ring", "zigzag"))
    assert shard.labels.tolist() == [[2, 3, IGNORE_INDEX, IGNORE_INDEX], [5, 6, 7, IGNORE_INDEX]]
    assert count_targets([batch]).item() == 5


@pytest.mark.parametrize("batch, message", [
    ({"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long),
      "attention_mask": torch.tensor([[0, 1, 1, 1]])}, "DataCollatorWithFlattening"),
    ({"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
      "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])}, "batch size 1"),
    ({"input_ids": torch.ones(1, 4, dtype=torch.long)}, "needs 'input_ids' and 'labels'"),
    ({"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long),
      "pixel_values": torch.ones(1)}, "unsupported keys ['pixel_values']"),
])
def test_unsupported_batches_are_named(batch, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        shard_batch(batch, SequenceParallel("ring", "zigzag"))


def test_bf16_autocast_like_trainer_bf16():
    """Trainer(bf16=True) runs the model under autocast: transformers hands over fp32 q/k and a
    bf16 v; the adapter casts them as autocast does for transformers' own SDPA. Same loss as
    the eager model under the same autocast, within bf16 rounding (2e-2 on a loss of ~5.5)."""
    pytest.importorskip("transformers")
    from recipes.examples.tiny_hf import chunked_examples, tiny_llama
    from ringattn.integrations.batch import loss_sum
    from ringattn.models.hf import use_ringattn

    batch = {k: torch.stack([e[k] for e in chunked_examples(2, 64)]) for k in ("input_ids", "labels")}
    sp = SequenceParallel("ring", "zigzag")
    shard = shard_batch(batch, sp)
    n = count_targets([batch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = tiny_llama(seed=0)(**batch, use_cache=False).loss
        got = loss_sum(use_ringattn(tiny_llama(seed=0))(**shard.model_kwargs(sp)).logits, shard.labels) / n
    assert abs(got.item() - want.item()) <= 2e-2, (got.item(), want.item())


# ---------------------------------------------------------------- DP x SP groups (4 processes)

class _Accelerator:
    """What SequenceParallelism reads from an ``accelerate.Accelerator`` (world of 4, no launcher here)."""

    def __init__(self, world):
        self.num_processes, self.gradient_accumulation_steps, self.device = world, 1, torch.device("cpu")


def _dp_sp_groups(rank, world):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from ringattn.integrations.accelerate import SequenceParallelism

    spm = SequenceParallelism(_Accelerator(world), sp_size=2)
    # 16 one-token-id sequences; example i has i % 3 ignored labels
    data = [{"input_ids": torch.full((4,), i), "labels": torch.tensor([i] * (4 - i % 3) + [IGNORE_INDEX] * (i % 3))}
            for i in range(16)]
    loader = prepare_data_loader(DataLoader(data, batch_size=2), num_processes=world, process_index=rank)
    batches = list(spm.data_loader(loader))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    try:  # accelerate shards an IterableDataset by examples: the SP group could not share them
        spm.data_loader(prepare_data_loader(DataLoader(Stream(), batch_size=2), num_processes=world,
                                            process_index=rank))
        refused = ""
    except ValueError as e:
        refused = str(e)
    return (spm.dp_rank, spm.sp.rank, [b["input_ids"][:, 0].tolist() for b in batches],
            spm.count_targets(batches).item(), spm.grad_scale, refused)


@pytest.mark.slow  # 4 ranks (dp 2 x sp 2)
def test_dp_sp_groups_read_batches_and_count_targets():
    """World 4 = dp 2 x sp 2: SP groups are consecutive ranks; both ranks of an SP group read
    the same batches, the two DP groups read disjoint halves of the data; the target count
    is the whole global batch's on every rank; gradients are scaled by the world; an
    IterableDataset is refused."""
    from tests.distributed import run_distributed

    out = run_distributed(_dp_sp_groups, 4, timeout=180)
    assert [(o[0], o[1]) for o in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert out[0][2] == out[1][2] and out[2][2] == out[3][2]
    seen = sorted(i for o in (out[0], out[2]) for batch in o[2] for i in batch)
    assert seen == list(range(16)), seen
    # after the shift, example i keeps labels[1:]: 3 - i % 3 valid targets
    want = sum(3 - i % 3 for i in range(16))
    assert [o[3] for o in out] == [want] * 4 and [o[4] for o in out] == [4] * 4
    assert all("IterableDataset" in o[5] for o in out), out[0][5]


# ---------------------------------------------------------------- the examples, end to end

def _run(cmd, timeout=420):
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _calls(module, runs) -> str:
    """Python source running ``module.main(argv)`` for each argv, in one process (one import)."""
    return f"from recipes.{module} import main\n" + "".join(f"main({argv!r})\n" for argv in runs)


def _losses(out_dir):
    return json.loads((out_dir / "losses.json").read_text())


def _assert_same(got, want, what):
    assert len(got["losses"]) == len(want["losses"]) == 5, what
    err = max(abs(a - b) for a, b in zip(got["losses"], want["losses"]))
    assert err <= TOL, f"{what}: per-step losses differ by {err:.2e}\n sp: {got['losses']}\n ref: {want['losses']}"


# Trainer on fixed-length chunks and on DataCollatorWithFlattening packs; TRL's SFTTrainer padding-free
TRAINER_CASES = {"chunked-ga2": ["--grad-accum", "2"], "packed-ga2": ["--packing", "--grad-accum", "2"],
                 "trl-sft-ga2": ["--trl", "--grad-accum", "2"]}


@pytest.mark.slow
def test_trainer_and_accelerate_sp2_match_stock_single_process(tmp_path):
    """Trainer / SFTTrainer sp=2 (DDP; DeepSpeed ZeRO-2) and the accelerate loop at sp=2 vs no ringattn at all."""
    out = {k: tmp_path / k for k in ("ref", "sp2", "ds")}
    refs = [[*a, "--baseline", "--output-dir", str(out["ref"] / c)] for c, a in TRAINER_CASES.items()]
    # pure DP over the 2 processes (sp=1, 4 documents each) = one process with 8 documents per micro-batch
    refs.append([*TRAINER_CASES["packed-ga2"], "--batch-size", "8", "--baseline", "--output-dir", str(out["ref"] / "b8")])
    acc = ["--packing", "--grad-accum", "2"]
    ref_script = _calls("examples.hf_trainer_sp", refs) + _calls("examples.accelerate_sp", [
        [*acc, "--baseline", "--output-dir", str(out["ref"] / "accelerate")]])
    _run([sys.executable, "-c", ref_script])  # one process: the stock Trainer and plain loop
    script = tmp_path / "trainer_sp2.py"
    doc_layout = [*TRAINER_CASES["packed-ga2"], "--layout", "doc_zigzag", "--gradient-checkpointing"]
    script.write_text(_calls("examples.hf_trainer_sp", [[*a, "--sp-size", "2", "--output-dir", str(out["sp2"] / c)]
                                               for c, a in TRAINER_CASES.items()]
                             + [[*doc_layout, "--sp-size", "2", "--output-dir", str(out["sp2"] / "doc_zigzag")],
                                [*TRAINER_CASES["packed-ga2"], "--sp-size", "1", "--output-dir", str(out["sp2"] / "dp2")]]))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)])
    # DeepSpeed needs its own process (accelerate's state is per process)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
          "recipes.examples.hf_trainer_sp", *TRAINER_CASES["packed-ga2"], "--sp-size", "2", "--zero", "2",
          "--output-dir", str(out["ds"])])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m",
          "recipes.examples.accelerate_sp", *acc, "--sp-size", "2", "--output-dir", str(out["sp2"] / "accelerate")])

    for case in TRAINER_CASES:
        got, want = _losses(out["sp2"] / case), _losses(out["ref"] / case)
        assert got["world_size"] == 2 and got["wrapped_model"] == "DistributedDataParallel"
        _assert_same(got, want, f"Trainer {case}")
        assert abs(got["eval_loss"] - want["eval_loss"]) <= TOL, (got["eval_loss"], want["eval_loss"])
        assert (out["sp2"] / case / "model" / "config.json").exists()
    _assert_same(_losses(out["sp2"] / "doc_zigzag"), _losses(out["ref"] / "packed-ga2"),
                 "Trainer doc_zigzag + gradient checkpointing")
    _assert_same(_losses(out["sp2"] / "dp2"), _losses(out["ref"] / "b8"), "Trainer dp=2 sp=1")
    ds = _losses(out["ds"])
    assert ds["world_size"] == 2 and ds["wrapped_model"] == "DeepSpeedEngine"
    _assert_same(ds, _losses(out["ref"] / "packed-ga2"), "Trainer + DeepSpeed ZeRO-2")
    got = _losses(out["sp2"] / "accelerate")
    assert got["world_size"] == 2
    _assert_same(got, _losses(out["ref"] / "accelerate"), "accelerate loop")


@pytest.mark.slow  # two Trainer runs (~25 s)
def test_trainer_sp2_runs_a_hybrid_like_the_stock_trainer(tmp_path):
    """A Gated DeltaNet hybrid (tiny Qwen3-Next from a local directory) through the Trainer at
    sp=2: its mixers run head-parallel under ``SequenceParallelism`` (refused before; on each
    shard alone they would be wrong) and the losses are the stock single-process Trainer's."""
    from tests.test_hf_mixers import _save_tiny_hybrid

    path = _save_tiny_hybrid("qwen3_next", tmp_path / "base")
    args = ["--model-path", path]
    _run([sys.executable, "-m", "recipes.examples.hf_trainer_sp", *args, "--baseline",
          "--output-dir", str(tmp_path / "ref")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
          "recipes.examples.hf_trainer_sp", *args, "--sp-size", "2", "--output-dir", str(tmp_path / "sp2")])
    got, want = _losses(tmp_path / "sp2"), _losses(tmp_path / "ref")
    assert got["world_size"] == 2
    _assert_same(got, want, "Trainer, Qwen3-Next hybrid")
    assert abs(got["eval_loss"] - want["eval_loss"]) <= TOL

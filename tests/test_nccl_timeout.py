"""The collective-timeout message under NCCL (recipes/distributed.py): NCCL's watchdog must not
tear the process down before ``comm_failure`` prints the message naming
parallel.collective_timeout_s. CPU tests of the logic; the NCCL group itself is created on a
GPU by tests/test_gpu.py."""
from __future__ import annotations

import pytest
import torch.distributed as dist

pytest.importorskip("omegaconf")
from recipes.distributed import NCCL_ERROR_HANDLING, ParallelConfig, comm_failure, nccl_error_handling  # noqa: E402
from tests.device_strict import fake_world  # noqa: E402


@pytest.mark.parametrize("before", [None, "1", "2"])
def test_nccl_error_handling_is_clean_up_only(before):
    """Torch's default (3, the variable unset) and torchrun's (1: its agent sets it for every
    rank) tear the process down from the watchdog thread; 2 aborts the communicators and lets
    the error reach the main thread."""
    env = {"TORCHELASTIC_RUN_ID": "job"}
    if before is not None:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = before
    note = nccl_error_handling(env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == NCCL_ERROR_HANDLING == "2"
    if before in (None, "2"):
        assert note is None
    else:
        assert f"={before} (torchrun's) -> 2" in note


@pytest.mark.parametrize("before, torchrun", [("3", True), ("0", False), ("1", False)])
def test_a_users_explicit_nccl_error_handling_is_kept_with_a_warning(before, torchrun):
    """A value the user set (anything but torchrun's 1 under torchrun) is the user's choice: kept,
    and the warning says what the clear timeout message needs."""
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": before, **({"TORCHELASTIC_RUN_ID": "job"} if torchrun else {})}
    with pytest.warns(UserWarning, match=rf"TORCH_NCCL_ASYNC_ERROR_HANDLING={before} is set: kept.*"
                                         r"needs TORCH_NCCL_ASYNC_ERROR_HANDLING=2"):
        assert nccl_error_handling(env) is None
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == before


def test_the_watchdog_timeout_reaching_the_main_thread_gets_the_clear_message():
    """What NCCL raises in the main thread after the watchdog aborted a timed-out collective
    (a DistBackendError) is reported as a failed collective, naming the timeout setting."""
    error = dist.DistBackendError(
        "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
        "OpType=ALLREDUCE, Timeout(ms)=20000) ran for 20012 milliseconds before timing out.")
    cfg = ParallelConfig(sp_size=2, collective_timeout_s=20)
    with fake_world(1, 2):
        message = comm_failure(error, cfg)
        assert message is not None and message.startswith("rank 1 of 2: a collective failed")
        assert "parallel.collective_timeout_s=20s" in message and "DistBackendError" in message
        assert comm_failure(ValueError("a bad config"), cfg) is None

"""The CUDA path on a real GPU: the checks scripts/device_check.sh runs on one GPU.

Each test that needs CUDA is skipped without it, with that reason; where the same logic runs
on any device the test is parametrized over ("cpu", "cuda"), so its Python runs on CPU too.
Nothing here needs a package beyond torch and pytest (the recipe-level checks skip, saying
so, when omegaconf -- carried as a wheel, docs/gpu.md -- is absent). One GPU: no multi-rank
NCCL; the NCCL checks use a world of one (group device, timeout options, error handling).
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.nn.functional as F

import ringattn
from ringattn import profile
from ringattn.kernels import BACKENDS
from ringattn.plan import _to_device
from tests.reference import reference_attention, rel_err
from tests.test_merge_hidden_rows import documents_case, virtual_ring

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (this machine has none)")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture
def nccl_world_of_one(tmp_path):
    """The default process group: NCCL, world of one, on the current GPU."""
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1, device_id=torch.device("cuda", torch.cuda.current_device()))
    yield
    dist.destroy_process_group()


@needs_cuda
@pytest.mark.parametrize("kernel", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_torch_fused_cuda_kernels_match_float64(kernel):
    """torch's own fused CUDA attention kernels (what transformers' "sdpa" and our ``sdpa``
    backend run), each forced with ``sdpa_kernel``: causal GQA forward + backward in bf16
    against float64. Tolerance 2e-2 of the reference's max: bf16 keeps 8 bits (~4e-3
    relative per rounding) and a row sums 256 of them in fp32; the fp64 reference is exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    b, s, h, hk, d = 2, 256, 8, 2, 64
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    dout = torch.randn_like(q)
    try:
        with sdpa_kernel(getattr(SDPBackend, kernel)):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True,
                                                 enable_gqa=True).transpose(1, 2)
            out.backward(dout)
    except RuntimeError as e:
        pytest.skip(f"{kernel} is not available on this GPU / build: {str(e).splitlines()[0]}")
    ref_out, _, ref_dq, ref_dk, ref_dv = reference_attention(q.cpu(), k.cpu(), v.cpu(),
                                                             dout.cpu(), causal=True)
    for got, want in ((out, ref_out), (q.grad, ref_dq), (k.grad, ref_dk), (v.grad, ref_dv)):
        assert rel_err(got.cpu(), want) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world", [2, 4])
def test_virtual_ring_with_the_sdpa_kernel_hidden_rows_and_device_masks(device, world):
    """The ring's exact per-rank schedule on one device with ringattn's ``sdpa`` kernel (CUDA:
    torch's memory-efficient attention; CPU: torch's flash kernel): plans and masks on the
    device, short packed documents under the striped layout (rows that a block hides
    entirely, where the fused kernel may write anything), fp32 against float64. Tolerance
    1e-4: fp32 accumulation over <= 32 keys (~1e-6) with headroom for the kernel's exp."""
    cu, (q, k, v), ref_out, ref_lse = documents_case(device, torch.float32)
    for dense in (False, True):  # the schedule (varlen bands), then dense masked blocks
        results = virtual_ring(BACKENDS["sdpa"], "striped", world, cu, q, k, v, dense=dense)
        for rank, (held, out, lse, _) in enumerate(results):
            assert out.device.type == device and not out.isnan().any(), f"rank {rank}: NaN"
            assert rel_err(out.cpu(), ref_out[:, held.cpu()]) < 1e-4
            assert rel_err(lse.cpu(), ref_lse[:, :, held.cpu()]) < 1e-4
    assert sum(r[3] for r in results) > 0


@needs_cuda
def test_ring_at_world_one_over_nccl_keeps_plan_positions_and_masks_on_the_gpu(nccl_world_of_one):
    """ring_attention over an NCCL group of one (the ring of one step) and the one front door:
    the group's device is the current GPU, ``sp.positions`` lands there without being told,
    a plan prepared without a device (the README's call) takes the GPU, its masks live there,
    and documents + a window match float64 (fp32; tolerance as above)."""
    from ringattn.comm import group_device

    assert group_device() == torch.device("cuda", torch.cuda.current_device())
    sp = ringattn.SequenceParallel("ring", "zigzag")
    assert sp.positions(32).device.type == "cuda"
    cu, (q, k, v), _, _ = documents_case("cuda", torch.float32)
    plan = sp.prepare(q.shape, cu_seqlens=cu)
    out = sp.attention(q, k, v, causal=True, window_size=(4, 0), plan=plan)
    assert plan.device.type == "cuda"
    tasks = plan.local_tasks(True, (4, 0))
    assert all(t.mask is None or t.mask.is_cuda for t in tasks)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    pos = torch.arange(len(doc))
    visible = (doc[:, None] == doc[None, :]) & (pos[:, None] - pos[None, :] <= 4)
    ref, *_ = reference_attention(q.cpu(), k.cpu(), v.cpu(), torch.zeros_like(q.cpu()),
                                  causal=True, mask=visible)
    assert rel_err(out.cpu(), ref) < 1e-4
    ring = ringattn.ring_attention(q, k, v, causal=True, cu_seqlens=cu, window_size=(4, 0))
    assert rel_err(ring.cpu(), ref) < 1e-4


@needs_cuda
def test_profile_times_cuda_regions_with_events():
    """``profile.cuda_events``: CUDA regions get timing events on the current stream, read at
    exit (a matmul chain of ~1 GFLOP takes > 0 s)."""
    a = torch.randn(1024, 1024, device="cuda")
    assert isinstance(profile.cuda_events(a.device), torch.cuda.Event)
    with profile.RingProfile() as prof:
        with profile.timed("compute_s", a.device):
            for _ in range(4):
                a = a @ a / 32
    assert prof.compute_s > 0 and not prof._pending


@needs_cuda
def test_plan_copies_host_tensors_pinned_and_non_blocking():
    """``plan._to_device``: pinned host memory, a non-blocking copy, the same values."""
    t = torch.arange(1000)
    on = _to_device(t, torch.device("cuda", torch.cuda.current_device()))
    assert on.is_cuda and torch.equal(on.cpu(), t)


@needs_cuda
def test_activation_offload_on_cuda_gives_the_same_step():
    """Llama with the checkpointed layer inputs offloaded to pinned host memory
    (``tiling.activation_offload``: ``save_on_cpu``) computes the same loss and gradients."""
    from ringattn.models import Llama, LlamaConfig
    from ringattn.models.tiling import activation_offload

    assert isinstance(activation_offload(torch.device("cuda")), torch.autograd.graph.save_on_cpu)
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)
        cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=101, activation_checkpointing=True,
                          offload_activations=offload)
        model = Llama(cfg).cuda().train()
        tokens = torch.randint(0, 101, (1, 64), device="cuda")
        loss = model(tokens, torch.arange(64, device="cuda"), labels=tokens).loss_sum
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same kernels, same order: bitwise


@needs_cuda
def test_mesh_timeout_options_for_nccl():
    """``mesh._timeout_options("cuda", ...)``: NCCL options carrying the collective timeout."""
    from ringattn.mesh import _timeout_options

    backend, options = _timeout_options("cuda", datetime.timedelta(seconds=17))
    assert backend == "nccl" and options._timeout == datetime.timedelta(seconds=17)


@needs_cuda
def test_recipe_nccl_world_sets_clean_up_only_error_handling(monkeypatch):
    """recipes.distributed.init_world on a GPU: an NCCL group on the rank's GPU with
    TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (so a timeout's message prints, tests/test_nccl_timeout.py)."""
    pytest.importorskip("omegaconf", reason="recipes need omegaconf: carry its wheel (docs/gpu.md)")
    import torch.distributed as dist

    from recipes import distributed

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        monkeypatch.delenv(name, raising=False)
    try:
        device = distributed.init_world(datetime.timedelta(seconds=60))
        assert device.type == "cuda" and dist.get_backend() == "nccl"
        assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    finally:
        distributed.shutdown()


@needs_cuda
def test_peak_memory_counts_cuda_allocations():
    """recipes.memory.PeakMemory on CUDA reads torch.cuda's allocator counters."""
    from recipes.memory import PeakMemory

    device = torch.device("cuda", torch.cuda.current_device())
    with PeakMemory(device) as mem:
        x = torch.empty(1 << 20, dtype=torch.float32, device=device)
        del x
    assert mem.peak_bytes >= 4 << 20


def test_gpu_tests_skip_with_a_reason_on_cpu():
    """The dry run's promise: on a machine without CUDA every CUDA-only test here is skipped
    with the stated reason, never silently passed."""
    marks = [m for name, f in globals().items() if name.startswith("test_")
             for m in getattr(f, "pytestmark", []) if m.name == "skipif"]
    assert len(marks) >= 7
    assert all(m.kwargs["reason"].startswith("needs a CUDA device") for m in marks)
    assert all(bool(m.args[0]) == (not CUDA) for m in marks)



@needs_cuda
def test_checkpoint_saves_and_restores_the_cuda_rng():
    """recipes.checkpoint's RNG state carries torch.cuda's generator on a GPU."""
    pytest.importorskip("numpy")
    from recipes.checkpoint import _rng_state, _set_rng_state

    state = _rng_state()
    assert "cuda" in state
    first = torch.rand(4, device="cuda")
    _set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


@needs_cuda
def test_mfu_peak_comes_from_the_gpu_name():
    """recipes.train.peak_flops reads the GPU's name for the bf16 peak (None for an unknown
    GPU: MFU is then not shown rather than wrong)."""
    pytest.importorskip("deepspeed", reason="recipes.train needs deepspeed (not on the GPU machine "
                                            "unless its wheel is carried)")
    from recipes.choices import Dtype
    from recipes.train import TrainerConfig, peak_flops

    name = torch.cuda.get_device_name()
    peak = peak_flops(TrainerConfig(dtype=Dtype.bf16), torch.device("cuda"))
    assert (peak is None) == all(k not in name for k in ("H200", "H100", "A100", "L40S", "A10G"))

"""flash-attn 2.x adapter (optional extra ``ringattn[flash]``), imported lazily.

Forward uses the public ``flash_attn_func(..., return_attn_probs=True)``, which returns
the log-sum-exp. flash-attn has no public block backward, so backward calls
``flash_attn_interface._flash_attn_backward`` (as every ring implementation does); its
keyword names changed across 2.x releases, so we pass only the names it declares.
flash-attn supports GQA natively: no K/V repeat. Its causal mask is bottom-right aligned
for q_len != k_len; our layouts only request causal on square blocks, where both agree.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect

import torch


def _flash():
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "backend='flash_attn' needs the flash-attn package: pip install 'ringattn[flash]'"
        ) from e


class FlashAttnBackend:
    name = "flash_attn"
    # Irregular (document/window) blocks go to the fastest backend that takes a mask (and the
    # softcap, if any): sdpa, or math (``blocks._kernel_for``).
    supports_mask = False

    @property
    def supports_softcap(self) -> bool:
        """flash-attn >= 2.6 caps inside the kernel (``softcap``); older ones cannot."""
        if importlib.util.find_spec("flash_attn") is None:
            return True  # ``supports`` already says it cannot run at all
        return "softcap" in inspect.signature(_flash().flash_attn_func).parameters

    def supports(self, q):
        if q.device.type != "cuda":
            return "flash-attn runs on CUDA only"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs fp16/bf16, got {q.dtype}"
        if q.shape[-1] > 256 or q.shape[-1] % 8:
            return f"flash-attn needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install 'ringattn[flash]')"
        return None

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None):
        assert mask is None, "flash_attn blocks take no mask (ring routes masked blocks to sdpa)"
        assert not causal or q.shape[1] == k.shape[1], "causal blocks must be square"
        out, lse, _ = _flash().flash_attn_func(
            q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True,
            **({} if softcap is None else {"softcap": float(softcap)}),
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, softcap=None):
        assert mask is None, "flash_attn blocks take no mask (ring routes masked blocks to sdpa)"
        fa = _flash()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kwargs = dict(
            dout=dout.to(q.dtype).contiguous(), q=q.contiguous(), k=k.contiguous(),
            v=v.contiguous(), out=out.to(q.dtype).contiguous(), softmax_lse=lse.contiguous(),
            dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
            window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
            softcap=0.0 if softcap is None else float(softcap),
            alibi_slopes=None, deterministic=False, rng_state=None,
        )
        params = inspect.signature(fa._flash_attn_backward).parameters
        fa._flash_attn_backward(**{n: kwargs[n] for n in params if n in kwargs})
        return dq, dk, dv

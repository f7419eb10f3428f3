"""flash-attn 2.x adapter (optional extra ``ringattn[flash]``), imported lazily.

Forward uses the public ``flash_attn_func`` / ``flash_attn_varlen_func`` with
``return_attn_probs=True``, which return the log-sum-exp. flash-attn has no public block
backward, so backward calls ``flash_attn_interface._flash_attn_backward`` /
``_flash_attn_varlen_backward`` (as every ring implementation does). Their arguments changed
across 2.x (``window_size`` pair up to 2.6; ``window_size_left``/``_right`` from 2.7, where
they are ``torch.library`` custom ops whose Python signature is ``(*args, **kwargs)``), so
arguments are bound by name to the op's schema (or the function's signature): a parameter
ringattn cannot fill, or a setting the release cannot take, raises instead of being dropped.

Blocks map onto flash-attn's own features: a ``window`` band is its ``window_size``
(bottom-right aligned, as ours), packed documents its varlen (``cu_seqlens``), ``softcap``
its softcap (>= 2.6), GQA native (no K/V repeat). A top-left causal block of n >= m rows is
the band (-1, n - m); of n < m rows, the first n keys' triangle (later keys are hidden).

flash-attn does not apply a window as given (csrc/flash_attn/flash_api.cpp, 2.6.3 to 2.8.3):
a side >= seqlen_k becomes -1 (unbounded), and set_params_fprop then closes a one-sided
window's open side at seqlen_k (varlen: at max_seqlen_k, the argument). So (L, -1) on a block
of n >= m + 2 rows hides keys from its first rows, and a right side in [m, n - 2] becomes
unbounded. ``flash_window`` is that rule and ``expresses`` says whether a dense call keeps
the band exact; a block it would change runs as one varlen call (its batch as sequences)
whose max_seqlen_k is raised past every bound (``_max_lengths``), where neither the clamp nor
the closing bites. max_seqlen_k is only an upper bound for the kernel's grid: key blocks past
a sequence's own length exit at once.

flash-attn 2 takes one head size for q, k and v: mha_fwd / mha_varlen_fwd / mha_bwd /
mha_varlen_bwd in csrc/flash_attn/flash_api.cpp (2.6.3 and 2.8.3) check
``CHECK_SHAPE(v, ..., num_heads_k, head_size)`` with q's head_size. MLA's v (DeepSeek-V3:
128 against q/k's 192) is therefore zero-padded to q/k's size and out sliced back (in
backward dout and out padded, dv sliced): exact, the padded columns carry zeros
(``kernels.base.pad_head_dims``). A v wider than q/k pads q and k instead.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys

import torch

from .base import block_as_band as _block_window
from .base import cu_seqlens_tensors as _cu
from .base import (backward_one_head_size, cuda_problem, dense_as_varlen_backward, dense_as_varlen_forward, forward_one_head_size,
                   segment_bounds)

_COMPILED = "flash_attn_2_cuda"  # flash-attn 2's compiled module


def _flash():
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "backend='flash_attn' needs the flash-attn package: pip install 'ringattn[flash]'"
        ) from e


def _release() -> tuple[int, int]:
    """The installed flash-attn's (major, minor), read without importing it (which needs its
    kernels); (99, 0) when it is not installed (``supports`` says then that it cannot run)."""
    try:
        release = importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        return (99, 0)
    return tuple(int(x) for x in release.split(".")[:2])


def kernel_device_types() -> tuple[str, ...]:
    """The device types flash-attn's compiled module runs: CUDA, unless an already loaded
    module says otherwise in ``device_types`` (the test suite's CPU stand-in says ("cpu",);
    the real module has no such attribute)."""
    module = sys.modules.get(_COMPILED)
    return tuple(getattr(module, "device_types", ("cuda",))) if module is not None else ("cuda",)


@functools.lru_cache(maxsize=None)
def _parameters(name: str) -> tuple[tuple[str, bool], ...]:
    """((parameter, required), ...) of flash-attn's ``name``: from the custom op's schema
    where flash-attn registers one (>= 2.7 on torch >= 2.4), else from its signature."""
    fa = _flash()
    try:
        packet = getattr(torch.ops.flash_attn, name)
    except AttributeError:
        packet = None
    if packet is not None:
        return tuple((a.name, not a.has_default_value()) for a in packet.default._schema.arguments)
    params = inspect.signature(getattr(fa, name)).parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TypeError(f"flash-attn's {name} declares no parameter names and is not a "
                        "registered op; this flash-attn release is not supported")
    return tuple((p.name, p.default is p.empty) for p in params)


def _call(name: str, values: dict, needed: list[tuple[str, ...]]):
    """flash-attn's ``name`` with the ``values`` its parameters name. ``needed``: groups of
    alternative names of which one must be taken (a setting this call depends on)."""
    args = {}
    for param, required in _parameters(name):
        if param in values:
            args[param] = values[param]
        elif required:
            raise TypeError(f"flash-attn's {name} needs {param!r}, which ringattn does not "
                            "provide; this flash-attn release is not supported")
    for group in needed:
        if not any(n in args for n in group):
            raise TypeError(f"flash-attn's {name} takes none of {list(group)}; this "
                            "flash-attn release cannot run this block")
    return getattr(_flash(), name)(**args)


def flash_window(window, seqlen_k) -> tuple[int, int]:
    """The band flash-attn applies for ``window`` with causal=False, in our convention
    (bottom-right aligned, -1 = unbounded): mha_fwd / mha_varlen_fwd clamp a side >= seqlen_k
    to -1, then set_params_fprop sets `if (left < 0 && right >= 0) left = seqlen_k;` and
    `if (left >= 0 && right < 0) right = seqlen_k;` (seqlen_k: max_seqlen_k under varlen)."""
    left, right = (-1 if w >= seqlen_k else w for w in window)
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def _cutting(n, m, window) -> tuple[int, int]:
    """``window`` on an n x m block with -1 wherever that side hides no key: row i sees
    j >= i + m - n - left, which cuts a key only if the last row's bound m - 1 - left > 0,
    and j <= i + m - n + right, which cuts one only if row 0's bound m - n + right < m - 1."""
    left, right = window
    return (left if 0 <= left < m - 1 else -1), (right if 0 <= right < n - 1 else -1)


def expresses(n, m, window, seqlen_k=None) -> bool:
    """Whether flash-attn, given ``window`` (and causal=False) on a sequence of n queries and
    m keys, shows each query exactly the keys the band means. seqlen_k: what the rule is
    applied with (dense: m; varlen: max_seqlen_k)."""
    applied = flash_window(window, m if seqlen_k is None else seqlen_k)
    return _cutting(n, m, applied) == _cutting(n, m, window)


class FlashAttnBackend:
    name = "flash_attn"
    # Blocks cut by documents and windows reach flash-attn as varlen sequences and bands;
    # dense masks (shapes that are neither) go to sdpa or math (``blocks._kernel_for``).
    supports_mask = False
    supports_window = True

    @property
    def supports_softcap(self) -> bool:
        """flash-attn >= 2.6 caps inside the kernel (``softcap``); older ones cannot."""
        return _release() >= (2, 6)

    @property
    def supports_varlen(self) -> bool:
        """flash-attn >= 2.6.0 returns varlen lse as (heads, total_q), which the merge reads;
        up to 2.5.9 mha_varlen_fwd returns (batch, heads, max_seqlen_q), padded."""
        return _release() >= (2, 6)

    def device_problem(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """None if flash-attn runs this device/dtype/head_dim, else why not."""
        if device.type not in kernel_device_types():
            return "flash-attn runs on CUDA only"
        if device.type == "cuda":
            problem = cuda_problem("flash-attn 2", device, dtype, lambda major: major >= 8,
                                   "an Ampere (sm80) or newer GPU")
            if problem:
                return problem
        if head_dim > 256 or head_dim % 8:
            return f"flash-attn needs head_dim <= 256 and a multiple of 8, got {head_dim}"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install 'ringattn[flash]')"
        return None

    def supports(self, q):
        return self.device_problem(q.device, q.dtype, q.shape[-1])

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None, window=None,
                segments=None, cu_seqlens=None):
        assert mask is None, "flash_attn blocks take no mask (blocks._kernel_for routes them)"
        if q.shape[-1] != v.shape[-1]:  # one head size in flash_api.cpp: pad, slice (exact)
            return forward_one_head_size(self.forward, q, k, v, causal=causal, scale=scale, softcap=softcap,
                                         window=window, segments=segments, cu_seqlens=cu_seqlens)
        fa = _flash()
        extra = {} if softcap is None else {"softcap": float(softcap)}
        if segments is None:
            window, keys = _block_window(causal, window, q.shape[1], k.shape[1])
            k, v = k[:, :keys], v[:, :keys]
            if window is None or expresses(q.shape[1], keys, window):
                out, lse, _ = fa.flash_attn_func(
                    q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False,
                    window_size=window or (-1, -1), return_attn_probs=True, **extra)
                return out, lse
            return dense_as_varlen_forward(  # the batch as varlen sequences, each with its band
                lambda q, k, v, band, segs, cu: self.forward(q, k, v, causal=False, scale=scale, softcap=softcap,
                                                             window=band, segments=segs, cu_seqlens=cu),
                q, k, v, False, window)
        assert q.shape[0] == 1 and not causal, "varlen blocks: batch 1, causality in the window"
        cu_q, cu_k = _cu(segments, cu_seqlens, q.device)
        window = window or (-1, -1)
        out, lse, _ = fa.flash_attn_varlen_func(
            q[0], k[0], v[0], cu_q, cu_k, *_max_lengths(segments, window), dropout_p=0.0,
            softmax_scale=scale, causal=False, window_size=window, return_attn_probs=True, **extra)
        return out.unsqueeze(0), lse.unsqueeze(0)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, softcap=None,
                 window=None, segments=None, cu_seqlens=None):
        assert mask is None, "flash_attn blocks take no mask (blocks._kernel_for routes them)"
        if q.shape[-1] != v.shape[-1]:  # as forward: one head size, padded with zeros
            return backward_one_head_size(self.backward, dout, q, k, v, out, lse, causal=causal, scale=scale,
                                          softcap=softcap, window=window, segments=segments,
                                          cu_seqlens=cu_seqlens)
        keys = k.shape[1]
        if segments is None:
            band, keys = _block_window(causal, window, q.shape[1], k.shape[1])
            if band is not None and not expresses(q.shape[1], keys, band):
                return dense_as_varlen_backward(  # as forward: the batch as varlen sequences
                    lambda dout, q, k, v, out, lse, band, segs, cu: self.backward(
                        dout, q, k, v, out, lse, causal=False, scale=scale, softcap=softcap, window=band,
                        segments=segs, cu_seqlens=cu),
                    dout, q, k, v, out, lse, causal, window)
            window = band
        left, right = window or (-1, -1)
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        values = dict(
            dout=dout.to(q.dtype).contiguous(), q=q.contiguous(), k=k[:, :keys].contiguous(),
            v=v[:, :keys].contiguous(), out=out.to(q.dtype).contiguous(),
            softmax_lse=lse.contiguous(), dq=dq, dk=dk[:, :keys], dv=dv[:, :keys],
            dropout_p=0.0, softmax_scale=scale, causal=False,
            window_size=(left, right), window_size_left=left, window_size_right=right,
            softcap=0.0 if softcap is None else float(softcap),
            alibi_slopes=None, deterministic=False, rng_state=None,
        )
        needed = [("window_size", "window_size_left")] + ([("softcap",)] if softcap else [])
        if segments is None:
            _call("_flash_attn_backward", values, needed)
            return dq, dk, dv
        cu_q, cu_k = _cu(segments, cu_seqlens, q.device)
        values.update({n: values[n][0] for n in ("dout", "q", "k", "v", "out", "softmax_lse",
                                                 "dq", "dk", "dv")})
        values.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, zero_tensors=False)
        values["max_seqlen_q"], values["max_seqlen_k"] = _max_lengths(segments, (left, right))
        _call("_flash_attn_varlen_backward", values, needed)
        return dq, dk, dv


def _max_lengths(segments, window) -> tuple[int, int]:
    """(max_seqlen_q, max_seqlen_k) for flash_attn_varlen_func: upper bounds of the sequences'
    lengths, raised so that flash-attn's window rule (``flash_window``) keeps every sequence's
    band exact. max_seqlen_k > every window side: no side is clamped to -1; >= every
    sequence's s_q - 1: a one-sided (L, -1) closed at max_seqlen_k still reaches the last key
    from row 0 (j <= i + s_k - s_q + max_seqlen_k); >= s_k - 1: (-1, R) opened at max_seqlen_k
    reaches key 0 from the last row. max_seqlen_q >= 2: with max_seqlen_q == 1, GQA and no
    window, mha_varlen_fwd reshapes q to one row per sequence, which fails when a sequence
    has no rows."""
    spans = segment_bounds(segments)
    max_q = max(rq.stop - rq.start for rq, _ in spans)
    max_k = max(rk.stop - rk.start for _, rk in spans)
    return max(max_q, 2), max(max_k, max_q, window[0] + 1, window[1] + 1)

"""Plain-PyTorch attention kernel: any device, any dtype, fp32 accumulation.

It is the reference the fused backends are tested against, the fallback where no fused
kernel fits, and the torch path for logit softcapping (``softcap``), which PyTorch's
fused ops cannot apply. Queries are processed in row tiles so that memory is
O(tile * k_len) per head, never O(q_len * k_len): a tile's rows are independent in
forward (each row's out/lse) and backward (each row's dq; dk/dv are summed over tiles).
Causal tiles stop at their last row's key, which skips most of the hidden half; window tiles
(``window``, a band) cover only the band's columns, built on the fly per tile. Packed
sequences (``segments``) run one sequence at a time.
"""
from __future__ import annotations

import torch

from .base import accumulation_dtype, backward_segments, band, forward_segments

# Score elements (batch * heads * rows * k_len) one tile may hold: 2^25 fp32 = 128 MiB;
# and at most this many rows, so that causal tiles skip the keys above the diagonal.
_TILE_SCORES = 1 << 25
_TILE_ROWS = 256


def _row_tiles(q, k, causal, window=None):
    """[(query rows, key columns)]: causal tiles (top-left aligned) stop at their last row;
    window tiles span their rows' part of the band (possibly nothing)."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    rows = max(1, min(_TILE_ROWS, _TILE_SCORES // max(1, b * h * sk)))
    tiles = []
    for a in range(0, sq, rows):
        z = min(a + rows, sq)
        c0, c1 = 0, min(z, sk) if causal else sk
        if window is not None:  # bottom-right band: row i sees i+(sk-sq)-left .. i+(sk-sq)+right
            left, right = window
            if left >= 0:
                c0 = max(c0, a + sk - sq - left)
            if right >= 0:
                c1 = min(c1, z - 1 + sk - sq + right + 1)
        tiles.append((slice(a, z), slice(c0, max(c0, c1))))
    return tiles


def _scores(q, k, scale, causal, mask, softcap, rows, cols, window=None, sk=None):
    """fp32 (or fp64) scores (b, kv_heads, groups, len(rows), len(cols)) of query ``rows`` and
    keys ``cols`` (k already cut to them; ``sk`` keys in the block), softcapped then masked;
    GQA without repeating k."""
    b, _, h, d = q.shape
    hk = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qg = q[:, rows].to(acc).view(b, -1, hk, h // hk, d)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if causal:  # top-left aligned: query i sees keys j <= i
        i = torch.arange(rows.start, rows.stop, device=q.device).unsqueeze(1)
        j = torch.arange(cols.start, cols.stop, device=q.device)
        s = s.masked_fill(j > i, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask[rows, cols].to(s.device), float("-inf"))
    if window is not None:
        s = s.masked_fill(~band(q.shape[1], sk, window, q.device, rows, cols), float("-inf"))
    return s


class MathBackend:
    name = "math"
    supports_mask = True
    supports_softcap = True
    supports_window = True
    supports_varlen = True

    def supports(self, q):
        return None

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None, window=None,
                segments=None, cu_seqlens=None):
        if segments is not None:
            return forward_segments(self.forward, q, k, v, segments, causal=causal, scale=scale,
                                    mask=mask, softcap=softcap, window=window)
        b, sq, h, _ = q.shape
        dv = v.shape[-1]  # out takes v's head size (MLA: unlike q/k's)
        acc = accumulation_dtype(q.dtype)
        out = torch.zeros(b, sq, h, dv, dtype=acc, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
        for rows, cols in _row_tiles(q, k, causal, window):
            if cols.stop == cols.start:
                continue  # the band leaves these rows no key: out 0, lse -inf
            s = _scores(q, k[:, cols], scale, causal, mask, softcap, rows, cols, window, k.shape[1])
            tile_lse = torch.logsumexp(s, dim=-1)
            # softmax subtracts the row max before exp: exact even when |logits| is so large
            # that the fp32 lse itself is coarse. A row with no visible key gets p = 0, not NaN.
            p = torch.softmax(s, dim=-1).masked_fill(torch.isneginf(tile_lse).unsqueeze(-1), 0.0)
            pv = torch.einsum("bhgqk,bkhd->bqhgd", p, v[:, cols].to(acc))
            out[:, rows] = pv.reshape(b, -1, h, dv)
            lse[:, :, rows] = tile_lse.reshape(b, h, -1)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, softcap=None,
                 window=None, segments=None, cu_seqlens=None):
        if segments is not None:
            return backward_segments(self.backward, dout, q, k, v, out, lse, segments,
                                     causal=causal, scale=scale, mask=mask, softcap=softcap,
                                     window=window)
        b, sq, h, d = q.shape
        hk, dv_size = k.shape[2], v.shape[-1]
        g = h // hk
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(b, sq, h, d, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for rows, cols in _row_tiles(q, k, causal, window):
            if cols.stop == cols.start:
                continue
            s = _scores(q, k[:, cols], scale, causal, mask, softcap, rows, cols, window, k.shape[1])
            tile_lse = lse[:, :, rows].to(acc).view(b, hk, g, -1)
            # A row with no visible key has lse = -inf; keep its probabilities at 0, not NaN.
            lse_safe = torch.where(torch.isneginf(tile_lse), torch.zeros_like(tile_lse), tile_lse)
            p = torch.exp(s - lse_safe.unsqueeze(-1))
            do = dout[:, rows].to(acc).view(b, -1, hk, g, dv_size)
            # D = rowsum(dO * O) over the *final* output: the softmax Jacobian of the whole row.
            delta = (do * out[:, rows].to(acc).view(b, -1, hk, g, dv_size)).sum(-1).permute(0, 2, 3, 1)
            dv[:, cols] += torch.einsum("bhgqk,bqhgd->bkhd", p, do)
            dp = torch.einsum("bqhgd,bkhd->bhgqk", do, v[:, cols].to(acc))
            ds = p * (dp - delta.unsqueeze(-1))
            if softcap is not None:  # d(c*tanh(x/c))/dx = 1 - tanh^2 = 1 - (s/c)^2; masked: p = 0
                ds = ds * torch.where(p > 0, 1 - (s / softcap) ** 2, torch.zeros_like(s))
            ds = ds * scale
            dq[:, rows] = torch.einsum("bhgqk,bkhd->bqhgd", ds, k[:, cols].to(acc)).reshape(b, -1, h, d)
            dk[:, cols] += torch.einsum("bhgqk,bqhgd->bkhd", ds, q[:, rows].to(acc).view(b, -1, hk, g, d))
        return dq, dk, dv

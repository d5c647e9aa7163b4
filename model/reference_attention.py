"""Sparse Reference Attention: the reference video's full token sequence conditions every DiT layer.

Three kinds of tokens meet in each layer's attention:

    video      V  (the noisy latent being denoised)
    summary    S  (a few static tokens: learned queries + identity tokens, pooled over the reference)
    reference  R  (the reference video's latent patches, thousands of them)

Asymmetric pattern (rows attend to columns):

            V    S    R
        V   all  all  selected blocks   <- one softmax over all three ("joint" attention)
        S   -    all  all               <- global tokens: S pools the whole reference (|S| x |R|, linear)
        R   -    all  own chunk         <- within its temporal chunk (linear in |R|)

S and R never look at V, so the reference stream is independent of the noisy input and the timestep:
its per-layer K/V are computed once per generation (`ReferenceCache`) and reused at every sampling step.
Video queries see a subset of R chosen per query block of `query_block` tokens: the `top_k` reference
blocks of `block` tokens whose mean key best matches the block's mean query (block top-k, as in
MoBA / block-sparse video attention), or a fixed interleaved pattern. Cost per layer is then
|V| (|V| + |S| + k * block) + |R| (chunk + |S|): linear in the reference length. With pattern "dense"
every V and R row sees all of R (and R rows all of S + R): exactly full joint attention with the
reference kept causal-free of V.

Implementation. The video's softmax over [V; S; R_sel] is computed as two attentions merged by their
log-sum-exp (as flash / ring attention do): o_v, lse_v over V and o_r, lse_r over [S; R_sel], then

    o = o_v + g * sigmoid(lse_r - lse_v) * (o_r - o_v)        g: per-head `ref_gate`, zero-initialised

g = 1 is exact joint attention (sigmoid(lse_r - lse_v) is the share of softmax mass on the reference);
g = 0 (a fresh model) is exactly the text-to-video model's self-attention. Both partial attentions run
on fused SDPA kernels over compact K/V (the selected blocks are gathered), which on CPU is much faster
than FlexAttention's eager path (that one materialises the full score matrix); `attention_lse` gets the
log-sum-exp and its gradient from the fused CPU flash kernel (see `_FlashAttentionLSE`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATTERNS = ("topk", "fixed", "dense")
_FORCE_MATH = False
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
)


@contextlib.contextmanager
def math_attention():
    """Within this block `attention_lse` uses plain matmul/softmax (for reference checks, FLOP counting)."""
    global _FORCE_MATH
    old, _FORCE_MATH = _FORCE_MATH, True
    try:
        yield
    finally:
        _FORCE_MATH = old


# ---------------------------------------------------------------------------------------------------
# attention that also returns the log-sum-exp (differentiable in both outputs)


def _math_attention_lse(q, k, v, bias, scale):
    s = (q @ k.transpose(-1, -2)).float() * scale
    if bias is not None:
        s = s + bias
    lse = s.logsumexp(dim=-1)
    return ((s - lse[..., None]).exp().to(v.dtype) @ v), lse


class _FlashAttentionLSE(torch.autograd.Function):
    """(out, lse) from the fused CPU flash kernel, with gradients through both.

    The kernel's backward uses dS = P * (dO.V - D), D = rowsum(dO * O). A gradient g on lse adds P * g to
    dS; we get it from the same kernel by appending one channel: V' = [V, 1], dO' = [dO, g], O' = [O, 0]
    (so D is unchanged) and Q, K padded with a zero channel (scores unchanged)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, out, lse, bias = ctx.saved_tensors
        g_out = torch.zeros_like(out) if g_out is None else g_out
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse

        def extend(x, value):
            return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)

        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            torch.cat([g_out, g_lse[..., None].to(g_out.dtype)], dim=-1),
            extend(q, 0.0), extend(k, 0.0), extend(v, 1.0), extend(out, 0.0), lse,
            0.0, False, attn_mask=bias, scale=ctx.scale,
        )
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention q [B, H, Nq, d], k/v [B, H, Nk, d] -> (out [B, H, Nq, d], lse [B, H, Nq] float32).

    bias: optional additive float mask broadcastable to [B, H, Nq, Nk] (-inf = masked); every row needs
    at least one unmasked key. On CPU: the fused flash kernel; elsewhere (or in `math_attention()`):
    matmul + softmax (exact, O(Nq * Nk) memory: swap in a fused kernel with lse for large GPU runs)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cpu" and _HAS_CPU_FLASH and not _FORCE_MATH:
        if bias is not None:
            bias = bias.to(q.dtype)
        return _FlashAttentionLSE.apply(q, k, v, bias, scale)
    return _math_attention_lse(q, k, v, bias, scale)


def sdpa(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention (no lse needed); mask: bool, True = attend. Math path inside `math_attention()`."""
    if _FORCE_MATH:
        bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask, -math.inf)
        return _math_attention_lse(q, k, v, bias, q.shape[-1] ** -0.5)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def merge_reference(o_v: torch.Tensor, lse_v: torch.Tensor, o_r: torch.Tensor, lse_r: torch.Tensor,
                    gate: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """o_v + gate * share_r * (o_r - o_v); share_r = sigmoid(lse_r - lse_v) is the reference's share of one
    joint softmax, so gate = 1 is exact joint attention and gate = 0 is video-only. keep [B] (float/bool)
    switches the reference off per sample (condition dropout)."""
    w = torch.sigmoid(lse_r - lse_v)[..., None].to(o_v.dtype) * gate.view(1, -1, 1, 1).to(o_v.dtype)
    if keep is not None:
        w = w * keep.view(-1, 1, 1, 1).to(o_v.dtype)
    return o_v + w * (o_r - o_v)


# ---------------------------------------------------------------------------------------------------
# the reference side: per-layer K/V in a block layout


def _pad_to(x: torch.Tensor, dim: int, multiple: int, skip: int = 0) -> torch.Tensor:
    """Zero-pad `dim` so that its size minus `skip` is a multiple of `multiple` (no copy if it already is)."""
    extra = -(x.shape[dim] - skip) % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


@dataclass
class ReferenceKV:
    """One layer's reference keys/values, as video queries need them.

    k, v: [B, H, S + R_pad, d]: the S summary tokens first, then the reference tokens padded to a multiple
    of `block` (padding is masked); k_pool [B, H, n_blocks, d]: mean key of each block (padding excluded)."""

    k: torch.Tensor
    v: torch.Tensor
    k_pool: torch.Tensor
    n_summary: int
    n_ref: int
    block: int

    @classmethod
    def build(cls, k: torch.Tensor, v: torch.Tensor, n_summary: int, block: int) -> ReferenceKV:
        """k, v [B, H, S + R, d]: summary tokens first, then the reference tokens."""
        n_ref = k.shape[2] - n_summary
        # contiguous once here, so every sampling step gathers rows without copying the whole cache
        k, v = (_pad_to(x, 2, block, skip=n_summary).contiguous() for x in (k, v))
        n_blocks = (k.shape[2] - n_summary) // block
        counts = torch.full((n_blocks,), float(block), device=k.device)
        counts[-1] = block - (n_blocks * block - n_ref)
        k_pool = k[:, :, n_summary:].unflatten(2, (-1, block)).sum(dim=3) / counts[:, None].to(k.dtype)
        return cls(k, v, k_pool, n_summary, n_ref, block)

    @property
    def n_blocks(self) -> int:
        return self.k_pool.shape[2]

    def blocks(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, S + R_pad, d] -> [B, H, nb, block, d]
        return x[:, :, self.n_summary :].unflatten(2, (-1, self.block))

    def repeat(self, n: int) -> ReferenceKV:
        r = lambda x: x.repeat(n, *([1] * (x.dim() - 1)))  # noqa: E731
        return ReferenceKV(r(self.k), r(self.v), r(self.k_pool), self.n_summary, self.n_ref, self.block)


def select_blocks(q_pool: torch.Tensor, kv: ReferenceKV, top_k: int, pattern: str) -> torch.Tensor:
    """Indices [B, H, nq, k] of the reference blocks each video query block attends to."""
    b, h, nq, _ = q_pool.shape
    nb, k = kv.n_blocks, min(top_k, kv.n_blocks)
    if pattern == "topk":
        scores = torch.einsum("bhqd,bhnd->bhqn", q_pool.float(), kv.k_pool.float())
        return scores.topk(k, dim=-1).indices
    if pattern == "fixed":  # evenly spaced, offset per query block, so neighbouring blocks cover the rest
        j = torch.arange(k, device=q_pool.device) * (nb // k)
        idx = (j[None] + torch.arange(nq, device=q_pool.device)[:, None]) % nb
        return idx.expand(b, h, nq, k)
    raise ValueError(f"unknown sparse pattern {pattern!r}")


def attend_reference(q: torch.Tensor, kv: ReferenceKV, pattern: str, top_k: int,
                     query_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Video queries q [B, H, N, d] (RoPE applied) over [summary; reference] -> (o_r, lse_r).

    dense: all reference tokens; topk / fixed: for each block of `query_block` queries, the summary tokens
    and `top_k` gathered reference blocks (one fused attention call over the compact K/V)."""
    s, n_valid = kv.n_summary, kv.n_summary + kv.n_ref
    if pattern == "dense" or kv.n_blocks <= top_k:  # every block selected: the same set of keys
        return attention_lse(q, kv.k[:, :, :n_valid], kv.v[:, :, :n_valid])
    b, h, n, d = q.shape
    qb = _pad_to(q, 2, query_block).unflatten(2, (-1, query_block))  # [B, H, nq, qb, d]
    nq = qb.shape[2]
    counts = torch.full((nq,), float(query_block), device=q.device)
    counts[-1] = query_block - (qb.shape[2] * query_block - n)
    idx = select_blocks(qb.sum(dim=3) / counts[:, None].to(q.dtype), kv, top_k, pattern)  # [B, H, nq, k]
    k_sel = int(idx.shape[-1])
    # token rows to gather for each (batch, head, query block): the S summary tokens + the selected blocks
    length = kv.k.shape[2]
    tokens = s + idx[..., None] * kv.block + torch.arange(kv.block, device=q.device)  # [B, H, nq, k, block]
    tokens = torch.cat([torch.arange(s, device=q.device).expand(b, h, nq, s), tokens.flatten(-2)], dim=-1)
    rows = (tokens + (torch.arange(b * h, device=q.device) * length).view(b, h, 1, 1)).flatten()

    def gather(x: torch.Tensor) -> torch.Tensor:  # -> [B, H * nq, S + k * block, d], one row copy per token
        return x.reshape(b * h * length, d).index_select(0, rows).view(b, h * nq, s + k_sel * kv.block, d)

    bias = None
    if kv.n_blocks * kv.block > kv.n_ref:  # the last block is partly padding: mask it where it was selected
        bias = torch.zeros(tokens.shape, device=q.device).masked_fill(tokens >= s + kv.n_ref, -math.inf)
        bias = bias.view(b, h * nq, 1, -1)
    out, lse = attention_lse(qb.reshape(b, h * nq, query_block, d), gather(kv.k), gather(kv.v), bias)
    out = out.reshape(b, h, nq * query_block, d)[:, :, :n]
    return out, lse.reshape(b, h, nq * query_block)[:, :, :n]


def reference_keys_seen(kv: ReferenceKV, pattern: str, top_k: int) -> int:
    """How many reference tokens one video query attends to (summary tokens not counted)."""
    if pattern == "dense" or kv.n_blocks <= top_k:
        return kv.n_ref
    return min(kv.n_ref, top_k * kv.block)


def share_calibration(kv: ReferenceKV, pattern: str, top_k: int, calibrated_tokens: int) -> float:
    """What to subtract from lse_r so the reference's softmax share is that of `calibrated_tokens`
    reference tokens (the training length) whatever the reference's length: log(seen / calibrated),
    summary tokens counted on both sides. Without it the share grows with every extra key (a 16 s
    reference: 3x the keys of training, and the model copied its backdrop over the caption's; README)."""
    if calibrated_tokens <= 0:
        return 0.0
    seen = reference_keys_seen(kv, pattern, top_k)
    return math.log((kv.n_summary + seen) / (kv.n_summary + calibrated_tokens))


def reference_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_summary: int, pattern: str,
                             chunk: int) -> torch.Tensor:
    """The reference stream's own attention over its tokens [summary (S); reference]: q, k, v [B, H, S + R, d].

    Summary queries see everything. Reference queries see the summary and their chunk of `chunk`
    consecutive tokens (or, with pattern "dense", everything)."""
    s, r = n_summary, q.shape[2] - n_summary
    if pattern == "dense" or r <= chunk:
        return sdpa(q, k, v)
    o_sum = sdpa(q[:, :, :s], k, v)
    b, h, _, d = q.shape
    qc = _pad_to(q[:, :, s:], 2, chunk).unflatten(2, (-1, chunk))  # [B, H, nc, chunk, d]
    nc = qc.shape[2]

    def chunked(x):  # -> [B, H * nc, S + chunk, d]: each chunk's keys are [summary; the chunk]
        xc = _pad_to(x[:, :, s:], 2, chunk).unflatten(2, (-1, chunk))
        return torch.cat([x[:, :, None, :s].expand(-1, -1, nc, -1, -1), xc], dim=3).flatten(1, 2)

    mask = None
    pad = nc * chunk - r
    if pad:
        valid = torch.ones(nc, s + chunk, dtype=torch.bool, device=q.device)
        valid[-1, s + chunk - pad :] = False
        mask = valid.repeat(h, 1)[None, :, None, :]  # [1, H * nc, 1, S + chunk]
    o_ref = sdpa(qc.flatten(1, 2), chunked(k), chunked(v), mask)
    return torch.cat([o_sum, o_ref.reshape(b, h, nc * chunk, d)[:, :, :r]], dim=2)


__all__ = [
    "PATTERNS",
    "ReferenceKV",
    "attention_lse",
    "attend_reference",
    "math_attention",
    "merge_reference",
    "reference_self_attention",
    "select_blocks",
    "sdpa",
]

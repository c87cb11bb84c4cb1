"""coeff_attention: Coeff-Tuning's head-mixed attention (paper 004) as one custom op.

For H heads with probabilities P_g = softmax(scale · Q_g K_gᵀ + mask) (B, H, Nq, Nk) and an H × H coefficient
matrix C (Coeff-Tuning trains C = I + ΔC):

    out_h = Σ_g C[h, g] · P_g V_h              q (B, H, Nq, D), k / v (B, H_kv, Nk, D) -> out (B, H, Nq, D)

Grouped-query attention: H must be a multiple of H_kv, head h reads key/value head h // (H / H_kv). Masks: a key
padding mask kv_mask (B, Nk), True = attend, and ``causal`` aligned bottom-right like flash-attention (query i
sees key j iff j ≤ i + Nk − Nq). A query row that sees no key gets probabilities 0 (output 0, gradient 0), not
NaN. Dense (B, 1|H, Nq, Nk) masks are for the reference only (``coeff_attention_reference(attn_mask=...)``).

Three layers: the plain-torch reference that materialises all H maps (also the CPU backend), the Triton launchers
(pass 1 ``_triton_coeff_attn_lse``: each head's softmax normaliser; pass 2 ``_triton_coeff_attn_fwd``: P_g
rebuilt on chip, mixed, times V; backward ``_triton_coeff_attn_bwd_q`` (δ, dC, dQ) and ``_triton_coeff_attn_bwd_kv``
(dK, dV), all recomputing tiles: memory stays linear in the sequence length), and the custom ops
``spectralkern::coeff_attention`` / ``spectralkern::coeff_attention_backward`` with fake and autograd registrations.
"""
from __future__ import annotations

import math

import torch

from .._backend import Choice, backend_of, triton_interpreter_on
from ._interpreter import half_operands_ok
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._accumulation import accumulation_dtype

# ------------------------------------------------------------------------------------------ torch reference
def _accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return accumulation_dtype(*(t.dtype for t in tensors if t is not None))


def _keep_mask(batch: int, seq_q: int, seq_k: int, kv_mask: torch.Tensor | None, causal: bool,
               device: torch.device) -> torch.Tensor | None:
    """(B, 1, Nq, Nk) bool, True = attend, or None when nothing is masked."""
    keep = None
    if causal:
        rows = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
        keep = (torch.arange(seq_k, device=device)[None, :] <= rows)[None, None]
    if kv_mask is not None:
        pad = kv_mask.to(torch.bool)[:, None, None, :]
        keep = pad if keep is None else keep & pad
    return None if keep is None else keep.expand(batch, 1, seq_q, seq_k)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, kv_mask: torch.Tensor | None, causal: bool,
                            scale: float, attn_mask: torch.Tensor | None = None,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
    """P (B, H, Nq, Nk) = softmax(scale · Q Kᵀ + masks) in ``dtype``; rows that see no key are 0, not NaN.

    ``attn_mask``: optional dense mask broadcastable to (B, H, Nq, Nk), bool (True = attend) or additive float.
    """
    acc = dtype or _accumulation_dtype(q, k)
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.to(acc).repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q.to(acc), k.transpose(-1, -2)) * scale
    keep = _keep_mask(q.shape[0], q.shape[2], k.shape[2], kv_mask, causal, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            scores = scores + attn_mask.to(acc)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if scores.shape[-1] == 0:  # no keys: every map is empty (amax of an empty row is undefined)
        return torch.zeros_like(scores)
    row_max = scores.amax(dim=-1, keepdim=True)
    seen = torch.isfinite(row_max)  # False: every key of the row is masked
    probs = torch.softmax(torch.where(seen, scores, torch.zeros_like(scores)), dim=-1)
    return torch.where(seen, probs, torch.zeros_like(probs))


def coeff_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor | None, *,
                              causal: bool = False, kv_mask: torch.Tensor | None = None, scale: float | None = None,
                              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager out_h = Σ_g C[h, g] P_g V_h with all H maps P_g (B, H, Nq, Nk) materialised (the authors' way).

    Shapes as ``coeff_attention``; ``coeff`` None means C = I (plain attention). Computes in fp32 (fp64 when an
    input is fp64) and returns q's dtype. Differentiable (plain torch). ``attn_mask`` adds a dense mask
    (broadcastable to (B, H, Nq, Nk), bool True = attend, or additive float).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _accumulation_dtype(q, k, v, coeff)
    probs = attention_probabilities(q, k, kv_mask, causal, scale, attn_mask, acc)
    mixed = probs if coeff is None else torch.einsum("hg,bgij->bhij", coeff.to(acc), probs)
    v = v.to(acc).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.matmul(mixed, v).to(q.dtype)


def _forward_reference(q, k, v, coeff, kv_mask, causal, scale):
    """(out, lse) as the custom op returns them; lse (B, H, Nq) is +inf for rows that see no key."""
    acc = _accumulation_dtype(q, k, v, coeff)
    heads = q.shape[1]
    kk = k.to(acc).repeat_interleave(heads // k.shape[1], dim=1)
    scores = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    keep = _keep_mask(q.shape[0], q.shape[2], k.shape[2], kv_mask, causal, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    out = coeff_attention_reference(q, k, v, coeff, causal=causal, kv_mask=kv_mask, scale=scale)
    return out, lse


def _backward_reference(grad_out, q, k, v, coeff, kv_mask, causal, scale):
    """Explicit formulas, everything materialised (fp32/fp64): with D_h = dO_h V_hᵀ,
    dV_h = (Σ_g C_hg P_g)ᵀ dO_h, dC_hg = Σ_ij D_h ⊙ P_g, dP_g = Σ_h C_hg D_h, dS_g = P_g ⊙ (dP_g − rowsum(dP_g ⊙ P_g)),
    dQ_g = scale · dS_g K_g, dK_g = scale · dS_gᵀ Q_g; dK / dV summed over the query heads of each key/value head."""
    acc = _accumulation_dtype(grad_out, q, k, v, coeff)
    heads, kv_heads = q.shape[1], k.shape[1]
    rep = heads // kv_heads
    probs = attention_probabilities(q, k, kv_mask, causal, scale, None, acc)
    c, g_out = coeff.to(acc), grad_out.to(acc)
    qq = q.to(acc)
    kk = k.to(acc).repeat_interleave(rep, dim=1)
    vv = v.to(acc).repeat_interleave(rep, dim=1)
    d = torch.matmul(g_out, vv.transpose(-1, -2))                        # D_h (B, H, Nq, Nk)
    mixed = torch.einsum("hg,bgij->bhij", c, probs)
    dv = torch.matmul(mixed.transpose(-1, -2), g_out)
    dc = torch.einsum("bhij,bgij->hg", d, probs)
    dp = torch.einsum("hg,bhij->bgij", c, d)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qq) * scale
    batch, _, seq_k, dim = dk.shape
    dk = dk.view(batch, kv_heads, rep, seq_k, dim).sum(2)
    dv = dv.view(batch, kv_heads, rep, seq_k, dim).sum(2)
    return dq, dk, dv, dc


# ------------------------------------------------------------------------------------------ triton launchers
def _dtypes_for(*tensors: torch.Tensor):
    """(accumulation torch dtype, accumulation tl dtype, dot-operand tl dtype, dot precision)."""
    import triton.language as tl

    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64, tl.float64, "ieee"
    if (len({t.dtype for t in tensors}) == 1 and tensors[0].dtype in (torch.float16, torch.bfloat16)
            and half_operands_ok()):
        half = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[tensors[0].dtype]
        return torch.float32, tl.float32, half, "tf32"  # tensor-core operands in the input dtype, fp32 accumulate
    # fp32 inputs, mixed dtypes, or Triton's own interpreter (bf16 on bit patterns): fp32 operands, tf32x3 dots.
    return torch.float32, tl.float32, tl.float32, "tf32x3"


def _common_args(q, k, v, coeff, kv_mask, lse):
    """Sizes and strides every kernel takes in the same order (mask: a dummy pointer when absent)."""
    batch, heads, seq_q, dim = q.shape
    mask = kv_mask.view(torch.int8) if kv_mask is not None else lse  # bool as bytes: one pointer type (*i8)
    mask_strides = (kv_mask.stride(0), kv_mask.stride(1)) if kv_mask is not None else (0, 0)
    return (mask, (heads, heads // k.shape[1], seq_q, k.shape[2], dim, *q.stride(), *k.stride(), *v.stride(),
                   *coeff.stride(), *mask_strides, *lse.stride()))


def _d_pad(dim: int) -> int:
    import triton
    return max(16, triton.next_power_of_2(dim))


def _forward_triton(q, k, v, coeff, kv_mask, causal, scale):
    import triton

    from ._triton_coeff_attn_fwd import coeff_attn_fwd_kernel
    from ._triton_coeff_attn_fwd import tile_sizes as fwd_tiles
    from ._triton_coeff_attn_lse import LOG2E, coeff_attn_lse_kernel
    from ._triton_coeff_attn_lse import tile_sizes as lse_tiles

    batch, heads, seq_q, dim = q.shape
    acc_torch, acc_tl, dot_tl, precision = _dtypes_for(q, k, v)
    coeff = coeff.to(acc_torch)
    out = torch.empty((batch, heads, seq_q, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=acc_torch, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    d_pad, interp = _d_pad(dim), triton_interpreter_on()
    mask, args = _common_args(q, k, v, coeff, kv_mask, lse)
    flags = dict(D_PAD=d_pad, CAUSAL=causal, HAS_KV_MASK=kv_mask is not None, ACC_DTYPE=acc_tl, DOT_DTYPE=dot_tl,
                 DOT_PRECISION=precision)
    block_m, block_n, num_warps = lse_tiles(d_pad, interp)
    # Every grid is one axis (tiles × batch × head groups): axis 1 would cap batch · heads at 65,535.
    coeff_attn_lse_kernel[(triton.cdiv(seq_q, block_m) * batch * heads,)](
        q, k, mask, lse, heads, heads // k.shape[1], seq_q, k.shape[2], dim, *q.stride(), *k.stride(),
        *args[-5:], scale * LOG2E, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags)
    block_m, block_n, per_prog, num_warps = fwd_tiles(d_pad, triton.next_power_of_2(heads), interp)
    coeff_attn_fwd_kernel[(triton.cdiv(seq_q, block_m) * batch * triton.cdiv(heads, per_prog),)](
        q, k, v, coeff, mask, lse, out, *args, *out.stride(), scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, HEADS_PER_PROG=per_prog, num_warps=num_warps, **flags)
    return out, lse


def _backward_triton(grad_out, q, k, v, coeff, kv_mask, lse, causal, scale):
    import triton

    from ._triton_coeff_attn_bwd_kv import coeff_attn_bwd_kv_kernel
    from ._triton_coeff_attn_bwd_kv import tile_sizes as kv_tiles
    from ._triton_coeff_attn_bwd_q import coeff_attn_bwd_q_kernel
    from ._triton_coeff_attn_bwd_q import tile_sizes as q_tiles
    from ._triton_coeff_attn_lse import LOG2E

    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    acc_torch, acc_tl, dot_tl, precision = _dtypes_for(grad_out, q, k, v)
    coeff = coeff.to(acc_torch)
    dq = torch.zeros((batch, heads, seq_q, dim), dtype=acc_torch, device=q.device)
    dk = torch.zeros((batch, heads, seq_k, dim), dtype=acc_torch, device=q.device)
    dv = torch.zeros_like(dk)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk.view(batch, kv_heads, -1, seq_k, dim).sum(2), dv.view(batch, kv_heads, -1, seq_k, dim).sum(2), \
            torch.zeros((heads, heads), dtype=acc_torch, device=q.device)
    d_pad, h_pad, interp = _d_pad(dim), triton.next_power_of_2(heads), triton_interpreter_on()
    mask, args = _common_args(q, k, v, coeff, kv_mask, lse)
    flags = dict(D_PAD=d_pad, CAUSAL=causal, HAS_KV_MASK=kv_mask is not None, ACC_DTYPE=acc_tl, DOT_DTYPE=dot_tl,
                 DOT_PRECISION=precision)
    delta = torch.empty_like(lse)
    block_m, block_n, per_prog, num_warps = q_tiles(d_pad, h_pad, interp)
    tiles_q = triton.cdiv(seq_q, block_m)
    dc_parts = torch.zeros((batch, tiles_q, heads, heads), dtype=acc_torch, device=q.device)
    grid = (tiles_q * batch * triton.cdiv(heads, per_prog),)
    for phase in (1, 2):  # δ and dC first: dS needs the full row sum δ before any dQ tile
        coeff_attn_bwd_q_kernel[grid](
            q, k, v, coeff, mask, lse, grad_out, delta, dc_parts, dq, *args, *grad_out.stride(), *dc_parts.stride(),
            *dq.stride(), scale * LOG2E, scale, PHASE=phase, BLOCK_M=block_m, BLOCK_N=block_n,
            HEADS_PER_PROG=per_prog, H_PAD=h_pad, num_warps=num_warps, **flags)
    block_m, block_n, per_prog, num_warps = kv_tiles(d_pad, h_pad, interp)
    coeff_attn_bwd_kv_kernel[(triton.cdiv(seq_k, block_n) * batch * triton.cdiv(heads, per_prog),)](
        q, k, v, coeff, mask, lse, grad_out, delta, dk, dv, *args, *grad_out.stride(), *dk.stride(),
        scale * LOG2E, scale, BLOCK_M=block_m, BLOCK_N=block_n, HEADS_PER_PROG=per_prog, num_warps=num_warps,
        **flags)
    rep = heads // kv_heads  # grouped-query attention: the query heads sharing a key/value head add up
    return (dq, dk.view(batch, kv_heads, rep, seq_k, dim).sum(2), dv.view(batch, kv_heads, rep, seq_k, dim).sum(2),
            dc_parts.sum(dim=(0, 1)))


# ------------------------------------------------------------------------------------------ custom ops
def coeff_attention_backend(q: torch.Tensor, backend: str | None = None) -> Choice:
    """The registry's choice for a query like ``q`` (B, H, Nq, D)."""
    return backend_of("coeff_attention", q, backend=backend, head_dim=q.shape[-1])


@torch.library.custom_op("spectralkern::coeff_attention", mutates_args=())
def _coeff_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor,
                        kv_mask: torch.Tensor | None, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32/fp64: each head's softmax normaliser, +inf when a
    row sees no key)."""
    if coeff_attention_backend(q) == "triton":
        return _forward_triton(q, k, v, coeff, kv_mask, causal, scale)
    out, lse = _forward_reference(q, k, v, coeff, kv_mask, causal, scale)
    return out.contiguous(), lse.contiguous()


@_coeff_attention_op.register_fake
def _(q, k, v, coeff, kv_mask, causal, scale):
    acc = _accumulation_dtype(q, k, v)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc)


@torch.library.custom_op("spectralkern::coeff_attention_backward", mutates_args=())
def _coeff_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 coeff: torch.Tensor, kv_mask: torch.Tensor | None, lse: torch.Tensor, causal: bool,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_coeff) in the dtypes of q, k, v and coeff."""
    if coeff_attention_backend(q) == "triton":
        dq, dk, dv, dc = _backward_triton(grad_out, q, k, v, coeff, kv_mask, lse, causal, scale)
    else:
        dq, dk, dv, dc = _backward_reference(grad_out, q, k, v, coeff, kv_mask, causal, scale)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(),
            dc.to(coeff.dtype).contiguous())


@_coeff_attention_backward_op.register_fake
def _(grad_out, q, k, v, coeff, kv_mask, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), coeff.new_empty(coeff.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, coeff, kv_mask, causal, scale = inputs
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, coeff, kv_mask, output[1])


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, coeff, kv_mask, lse = ctx.saved_tensors
    dq, dk, dv, dc = torch.ops.spectralkern.coeff_attention_backward(grad_out, q, k, v, coeff, kv_mask, lse,
                                                                     ctx.causal, ctx.scale)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, dc if need[3] else None,
            None, None, None)


_coeff_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ public API
def check_coeff_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor | None,
                                 kv_mask: torch.Tensor | None) -> None:
    """Raise TypeError / ValueError naming the argument, what it got and what was expected."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    batch, heads, _, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, H_kv, Nk, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"k must be (B={batch}, H_kv, Nk, D={dim}) to match q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"the number of query heads (q.shape[1] = {heads}) must be a positive multiple of the "
                         f"key/value heads (k.shape[1] = {k.shape[1]})")
    for name, t in (("k", k), ("v", v)):
        check_same_device(name, t, "q", q)
    if coeff is not None:
        check_tensor("coeff", coeff, ndim=2, dtypes=FLOAT_DTYPES)
        if tuple(coeff.shape) != (heads, heads):
            raise ValueError(f"coeff must be (H, H) = ({heads}, {heads}) for q with {heads} heads, got "
                             f"{tuple(coeff.shape)}")
        check_same_device("coeff", coeff, "q", q)
    if kv_mask is not None:
        check_tensor("kv_mask", kv_mask, ndim=2)
        if kv_mask.dtype != torch.bool:
            raise TypeError(f"kv_mask must be a bool tensor (True = attend), got {kv_mask.dtype}")
        if tuple(kv_mask.shape) != (batch, k.shape[2]):
            raise ValueError(f"kv_mask must be (B, Nk) = ({batch}, {k.shape[2]}), got {tuple(kv_mask.shape)}")
        check_same_device("kv_mask", kv_mask, "q", q)


def coeff_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor | None = None, *,
                    causal: bool = False, kv_mask: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """out_h = Σ_g C[h, g] · softmax(scale · Q_g K_gᵀ + masks) V_h without materialising any N × N map.

    Args:
        q: (B, H, Nq, D) float16/bfloat16/float32/float64, any strides.
        k, v: (B, H_kv, Nk, D), H a multiple of H_kv (grouped-query attention); same dtype family as q.
        coeff: (H, H), C (Coeff-Tuning passes I + dropout(ΔC)); None is the identity (plain attention).
        causal: mask key j for query i unless j ≤ i + Nk − Nq (bottom-right aligned).
        kv_mask: (B, Nk) bool, True = attend (False drops padded keys); None keeps every key.
        scale: the score scale (default D^-1/2).
    Returns:
        (B, H, Nq, D) in q's dtype; rows that see no key are 0. Differentiable w.r.t. q, k, v and coeff
        (accumulation in fp32, fp64 for fp64 inputs).
    """
    check_coeff_attention_inputs(q, k, v, coeff, kv_mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    if coeff is None:
        coeff = torch.eye(q.shape[1], dtype=_accumulation_dtype(q, k, v), device=q.device)
    out, _ = torch.ops.spectralkern.coeff_attention(q, k, v, coeff, kv_mask, bool(causal), float(scale))
    return out


__all__ = ["attention_probabilities", "coeff_attention", "coeff_attention_backend", "coeff_attention_reference"]

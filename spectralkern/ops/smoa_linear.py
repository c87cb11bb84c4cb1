"""smoa_linear: a Linear layer with SMoA's block-diagonal, Hadamard-modulated low-rank update, as one custom op.

With the K aligned spectral blocks (rows_k, cols_k) of a weight W (out × in), packed factors B (out × R) and
A (R × in) in block order (row p of B belongs to the p-th row of the permuted order, column q of A likewise), a
scale s and c ∈ {0, 1}:

    ΔW[rows_k, cols_k] = s · (B_k A_k) ⊙ W[rows_k, cols_k]     (zero outside the diagonal blocks)
    y = x (c·W + ΔW)ᵀ + bias

where B_k = B[p-range of block k], A_k = A[:, q-range of block k] (all R columns of B and rows of A take part;
SMoA's per-block ranks come from packing B and A block-diagonally, ``torch.block_diag``). The anchors M_k are the
base weight's own entries, so nothing besides W is stored.

Four layers: the plain-torch reference that materialises ΔW (the authors' formulation; the tests' oracle), the
torch backend (the CPU path: W_eff = c·W + s·W ⊙ mask ⊙ B̃Ã built in the weight's own coordinates, then one GEMM;
factor gradients from Gᵀx on the blocks), the Triton launchers (``_triton_smoa_fwd``: a GEMM with on-chip
modulated weight tiles, for y and grad_x; ``_triton_smoa_bwd``: dB, dA per block without materialising ΔW or
Gᵀx), and the custom ops ``spectralkern::smoa_linear`` / ``spectralkern::smoa_linear_backward`` with fake and
autograd registrations (eager calls enter through an autograd.Function sharing their functions).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._backend import Choice, backend_of
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._eager import eager_autograd
from ._interpreter import half_operands_ok

# ------------------------------------------------------------------------------------------ block layout
@dataclass(frozen=True)
class SMoALayout:
    """The K aligned blocks of one weight: which original rows / columns each block holds, in which order.

    ``index`` packs every integer array the kernels read into one int64 tensor (one argument for the custom op):
    ``[row_perm (out) | col_perm (in) | inv_row_perm (out) | inv_col_perm (in) | row_block (out) |
    col_block (in) | row_ptr (K+1) | col_ptr (K+1)]``. row_perm[p] is the original row at permuted position p;
    block k holds positions row_ptr[k]:row_ptr[k+1]; row_block[i] is the block of original row i.
    """
    index: torch.Tensor
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]

    @staticmethod
    def from_blocks(row_blocks: Sequence[torch.Tensor], col_blocks: Sequence[torch.Tensor]) -> SMoALayout:
        """Build from K (row indices, column indices) pairs that partition range(out) and range(in)."""
        if len(row_blocks) != len(col_blocks) or not row_blocks:
            raise ValueError(f"need the same positive number of row and column blocks, got {len(row_blocks)} "
                             f"and {len(col_blocks)}")
        row_perm = torch.cat([torch.as_tensor(b, dtype=torch.int64).reshape(-1) for b in row_blocks])
        col_perm = torch.cat([torch.as_tensor(b, dtype=torch.int64).reshape(-1) for b in col_blocks])
        for name, perm in (("row", row_perm), ("column", col_perm)):
            n = perm.numel()
            if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
                raise ValueError(f"the {name} blocks must partition range({n}) (each index exactly once)")
        row_sizes = tuple(int(torch.as_tensor(b).numel()) for b in row_blocks)
        col_sizes = tuple(int(torch.as_tensor(b).numel()) for b in col_blocks)
        device = row_perm.device

        def inverse_and_blocks(perm: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=device)
            block_of_position = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                                        torch.tensor(sizes, device=device))
            block = torch.empty_like(perm)
            block[perm] = block_of_position
            return inverse, block

        inv_row, row_block = inverse_and_blocks(row_perm, row_sizes)
        inv_col, col_block = inverse_and_blocks(col_perm, col_sizes)
        ptrs = [torch.tensor([0, *torch.tensor(s).cumsum(0).tolist()], dtype=torch.int64, device=device)
                for s in (row_sizes, col_sizes)]
        index = torch.cat([row_perm, col_perm.to(device), inv_row, inv_col.to(device), row_block,
                           col_block.to(device), *ptrs])
        return SMoALayout(index, row_sizes, col_sizes)

    @property
    def num_blocks(self) -> int:
        return len(self.row_sizes)

    @property
    def out_features(self) -> int:
        return sum(self.row_sizes)

    @property
    def in_features(self) -> int:
        return sum(self.col_sizes)

    @property
    def block_sizes(self) -> list[int]:
        return [*self.row_sizes, *self.col_sizes]

    def to(self, device: torch.device | str) -> SMoALayout:
        return SMoALayout(self.index.to(device), self.row_sizes, self.col_sizes)

    def parts(self) -> _Parts:
        return _unpack(self.index, self.block_sizes)

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(original row indices, original column indices)] per block, in the packed order."""
        parts = self.parts()
        r, c = parts.row_ptr.tolist(), parts.col_ptr.tolist()
        return [(parts.row_perm[r[k]:r[k + 1]], parts.col_perm[c[k]:c[k + 1]]) for k in range(self.num_blocks)]


@dataclass(frozen=True)
class _Parts:
    row_perm: torch.Tensor
    col_perm: torch.Tensor
    inv_row_perm: torch.Tensor
    inv_col_perm: torch.Tensor
    row_block: torch.Tensor
    col_block: torch.Tensor
    row_ptr: torch.Tensor
    col_ptr: torch.Tensor


def _unpack(index: torch.Tensor, block_sizes: Sequence[int]) -> _Parts:
    num_blocks = len(block_sizes) // 2
    out, inn = sum(block_sizes[:num_blocks]), sum(block_sizes[num_blocks:])
    lengths = [out, inn, out, inn, out, inn, num_blocks + 1, num_blocks + 1]
    return _Parts(*index.split_with_sizes(lengths))


# ------------------------------------------------------------------------------------------ torch reference
def smoa_delta_weight(weight: torch.Tensor, b_packed: torch.Tensor, a_packed: torch.Tensor, layout: SMoALayout,
                      scale: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Materialise ΔW (out × in): s · (B_k A_k) ⊙ W[rows_k, cols_k] scattered into each block, zero elsewhere.

    Computed in ``dtype`` (default: fp32, or fp64 when any input is fp64). Differentiable (plain torch).
    """
    return _delta_weight(weight, b_packed, a_packed, layout.index, layout.block_sizes, scale, dtype)


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _delta_weight(weight, b_packed, a_packed, index, block_sizes, scale, dtype=None):
    acc = dtype or _accumulation_dtype(weight, b_packed, a_packed)
    parts = _unpack(index, block_sizes)
    r_ptr, c_ptr = parts.row_ptr.tolist(), parts.col_ptr.tolist()
    w, b, a = weight.to(acc), b_packed.to(acc), a_packed.to(acc)
    delta = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for k in range(len(r_ptr) - 1):
        rows = parts.row_perm[r_ptr[k]:r_ptr[k + 1]]
        cols = parts.col_perm[c_ptr[k]:c_ptr[k + 1]]
        anchor = w[rows][:, cols]  # M_k, recomputed from the base weight
        block = (b[r_ptr[k]:r_ptr[k + 1]] @ a[:, c_ptr[k]:c_ptr[k + 1]]) * anchor
        delta[rows[:, None], cols[None, :]] = block  # in place on a fresh tensor: autograd-safe, no copies
    return delta * scale


def smoa_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, b_packed: torch.Tensor,
                          a_packed: torch.Tensor, layout: SMoALayout, scale: float,
                          include_base: bool = True) -> torch.Tensor:
    """Eager y = x (c·W + ΔW)ᵀ + bias with ΔW materialised (see ``smoa_delta_weight``); x (..., in) -> (..., out).

    Computes in fp32 (fp64 when an input is fp64) and returns x's dtype. Differentiable (plain torch).
    """
    return _reference(x, weight, bias, b_packed, a_packed, layout.index, layout.block_sizes, scale, include_base)


def _reference(x, weight, bias, b_packed, a_packed, index, block_sizes, scale, include_base):
    acc = _accumulation_dtype(x, weight, b_packed, a_packed)
    w_eff = _delta_weight(weight, b_packed, a_packed, index, block_sizes, scale, acc)
    if include_base:
        w_eff = w_eff + weight.to(acc)
    y = torch.nn.functional.linear(x.to(acc), w_eff, None if bias is None else bias.to(acc))
    return y.to(x.dtype)


def _backward_reference(grad_y, x, weight, b_packed, a_packed, index, block_sizes, scale, include_base,
                        need_x, need_w, need_factors):
    """Explicit formulas: dx = G W_eff, dW = (Gᵀx) ⊙ (c + s·BA on blocks), dB_k = H_k A_kᵀ, dA_k = B_kᵀ H_k with
    H_k = s (Gᵀx)[rows_k, cols_k] ⊙ W[rows_k, cols_k]. Everything materialised, in fp32/fp64."""
    acc = _accumulation_dtype(grad_y, x, weight, b_packed, a_packed)
    g, xs, w = grad_y.to(acc), x.to(acc), weight.to(acc)
    dx = dw = db = da = None
    if need_x or need_w:
        delta = _delta_weight(weight, b_packed, a_packed, index, block_sizes, scale, acc)
        if need_x:
            dx = g @ (delta + w if include_base else delta)
    if need_w or need_factors:
        gx = g.T @ xs  # (out, in)
        if need_w:
            # The modulation s·(B_k A_k) on the blocks: ΔW of an all-ones anchor.
            modulation = _delta_weight(torch.ones_like(w), b_packed, a_packed, index, block_sizes, scale, acc)
            dw = gx * (modulation + 1.0 if include_base else modulation)
        if need_factors:
            parts = _unpack(index, block_sizes)
            r_ptr, c_ptr = parts.row_ptr.tolist(), parts.col_ptr.tolist()
            b, a = b_packed.to(acc), a_packed.to(acc)
            db, da = torch.zeros_like(b), torch.zeros_like(a)
            for k in range(len(r_ptr) - 1):
                rows = parts.row_perm[r_ptr[k]:r_ptr[k + 1]]
                cols = parts.col_perm[c_ptr[k]:c_ptr[k + 1]]
                h = scale * gx[rows][:, cols] * w[rows][:, cols]
                db[r_ptr[k]:r_ptr[k + 1]] = h @ a[:, c_ptr[k]:c_ptr[k + 1]].T
                da[:, c_ptr[k]:c_ptr[k + 1]] = b[r_ptr[k]:r_ptr[k + 1]].T @ h
    return dx, dw, db, da


# ------------------------------------------------------------------------------------------ torch backend (CPU)
def _factors_and_mask(b_packed, a_packed, parts, acc):
    """(B̃ (out × R), Ã (R × in), mask (out × in)): the factors in the weight's own row / column order and the
    block mask, mask[o, i] = 1 where row_block[o] == col_block[i]. The mask is a K-deep product of one-hot block
    memberships (measured 4× faster than a broadcast ``==`` on the CPU)."""
    bt = b_packed.index_select(0, parts.inv_row_perm).to(acc)
    at = a_packed.index_select(1, parts.inv_col_perm).to(acc)
    blocks = torch.arange(parts.row_ptr.numel() - 1, device=bt.device)
    mask = (parts.row_block[:, None] == blocks).to(acc) @ (parts.col_block[None, :] == blocks[:, None]).to(acc)
    return bt, at, mask


def _effective_weight(weight, modulation, scale, include_base):
    """c·W + s·W ⊙ modulation, written into ``modulation``'s storage when c = 0."""
    w = weight.to(modulation.dtype)
    return torch.addcmul(w, w, modulation, value=scale) if include_base else modulation.mul_(w).mul_(scale)


def _forward_torch(x, weight, bias, b_packed, a_packed, index, block_sizes, scale, include_base):
    """The CPU backend's forward: W_eff = c·W + s·W ⊙ mask ⊙ B̃Ã in the weight's own coordinates (one r-deep GEMM
    and two elementwise passes, no 2-D gathers or scatters), then one addmm. fp32 (fp64 for fp64 inputs)."""
    acc = _accumulation_dtype(x, weight, b_packed, a_packed)
    bt, at, mask = _factors_and_mask(b_packed, a_packed, _unpack(index, block_sizes), acc)
    w_eff = _effective_weight(weight, torch.mm(bt, at).mul_(mask), scale, include_base)
    y = torch.nn.functional.linear(x.to(acc), w_eff, None if bias is None else bias.to(acc))
    return y.to(x.dtype)


# Up to this many blocks the factor gradients take Gᵀx over the whole weight (one GEMM, K× the useful FLOPs);
# above, only its diagonal blocks from permuted copies of G and x. At K = 2 the two cost the same measured time
# on the CPU (the gathers of G, x and the anchors eat the halved FLOPs) and the whole-weight route has fewer ops.
_WHOLE_GRAM_MAX_BLOCKS = 2


def _backward_torch(grad_y, x, weight, b_packed, a_packed, index, block_sizes, scale, include_base,
                    need_x, need_w, need_factors):
    """The CPU backend's backward, the formulas of ``_backward_reference`` without materialising what they do not
    need: W_eff recomputed for grad_x (the forward saves nothing out × in); Gᵀx restricted to the blocks by the
    mask, or computed on the diagonal blocks only when K is large. fp32 (fp64 for fp64 inputs)."""
    acc = _accumulation_dtype(grad_y, x, weight, b_packed, a_packed)
    parts = _unpack(index, block_sizes)
    num_blocks = len(block_sizes) // 2
    g = grad_y.to(acc)
    whole_gram = need_w or (need_factors and num_blocks <= _WHOLE_GRAM_MAX_BLOCKS)
    if need_x or whole_gram:  # (need_w implies whole_gram)
        bt, at, mask = _factors_and_mask(b_packed, a_packed, parts, acc)
    gx = g.T @ x.to(acc) if whole_gram else None
    dx = dw = db = da = None
    if need_x or need_w:
        modulation = torch.mm(bt, at).mul_(mask)
        if need_w:  # the base weight is trained too (not SMoA's setting)
            dw = gx * (modulation * scale + 1.0) if include_base else gx * (modulation * scale)
        if need_x:
            dx = g @ _effective_weight(weight, modulation, scale, include_base)
    if need_factors and whole_gram:
        # H = s·(Gᵀx) ⊙ W on the blocks; dB̃ = H Ãᵀ (as (Ã Hᵀ)ᵀ: 2× faster than H @ Ãᵀ on the CPU), dÃ = B̃ᵀ H in
        # original order, then back to the packed order.
        h = torch.mul(gx, weight.to(acc)).mul_(mask)
        db = torch.mm(at, h.T).T.index_select(0, parts.row_perm).mul_(scale)
        da = (bt.T @ h).index_select(1, parts.col_perm).mul_(scale)
    elif need_factors:
        db, da = _factor_grads_by_block(g, x.to(acc), weight, b_packed.to(acc), a_packed.to(acc), parts,
                                        block_sizes, scale)
    return dx, dw, db, da


def _factor_grads_by_block(g, x, weight, b, a, parts, block_sizes, scale):
    """dB_k = H_k A_kᵀ, dA_k = B_kᵀ H_k, H_k = s (G_kᵀ X_k) ⊙ W[rows_k, cols_k], block by block in the packed
    order: 2·T·out·in / K FLOPs for the Gram blocks, from column slices of G and x permuted once."""
    g_perm = g.index_select(1, parts.row_perm)
    x_perm = x.index_select(1, parts.col_perm)
    w_rows = weight.index_select(0, parts.row_perm)
    db, da = torch.empty_like(b), torch.empty_like(a)
    num_blocks = len(block_sizes) // 2
    r_ptr = [0, *itertools.accumulate(block_sizes[:num_blocks])]
    c_ptr = [0, *itertools.accumulate(block_sizes[num_blocks:])]
    for k in range(num_blocks):
        (r0, r1), (c0, c1) = r_ptr[k:k + 2], c_ptr[k:k + 2]
        h = g_perm[:, r0:r1].T @ x_perm[:, c0:c1]
        h.mul_(w_rows[r0:r1].index_select(1, parts.col_perm[c0:c1]))
        db[r0:r1] = h @ a[:, c0:c1].T
        da[:, c0:c1] = b[r0:r1].T @ h
    return db.mul_(scale), da.mul_(scale)


# ------------------------------------------------------------------------------------------ triton launchers
def _dtypes_for(*tensors: torch.Tensor):
    """(accumulation torch dtype, accumulation tl dtype, dot-operand tl dtype, big-dot precision, factor precision)."""
    import triton.language as tl

    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64, tl.float64, "ieee", "ieee"
    if all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors) and half_operands_ok():
        same = len({t.dtype for t in tensors}) == 1
        half = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[tensors[0].dtype]
        if same:  # tensor-core operands in the input dtype; the small factor products stay near-fp32
            return torch.float32, tl.float32, half, "tf32", "tf32x3"
    # fp32 inputs, mixed half dtypes, or Triton's own interpreter (bf16 on bit patterns): fp32 operands, tf32x3.
    return torch.float32, tl.float32, tl.float32, "tf32x3", "tf32x3"


def _launch_modulated_gemm(x, w, w_strides, bt, bt_strides, at, at_strides, row_block, col_block, bias, scale,
                           include_base, out_features, rank, out=None):
    """y (T × out_features) = x (W ⊙ (c + s·[blocks]·Bt At))ᵀ + bias; W (out_features × in), Bt (out_features × R)
    and At (R × in) are read through the given strides, so transposed operands need no copy. ``out``: a
    (T × out_features) tensor of x's dtype to write into (any strides) instead of a new one."""
    import triton

    from ._triton_smoa_fwd import smoa_modulated_gemm_kernel, tile_sizes

    num_t, num_in = x.shape
    y = out if out is not None else torch.empty((num_t, out_features), dtype=x.dtype, device=x.device)
    if num_t == 0 or out_features == 0:
        return y
    _, acc_tl, dot_tl, precision, mod_precision = _dtypes_for(x, w)
    block_t, block_o, block_i, num_warps = tile_sizes(x.element_size())
    r_pad = max(16, triton.next_power_of_2(max(rank, 1)))
    grid = (triton.cdiv(num_t, block_t) * triton.cdiv(out_features, block_o),)
    smoa_modulated_gemm_kernel[grid](
        x, w, bt, at, row_block, col_block, bias if bias is not None else y, y,
        num_t, out_features, num_in, rank,
        x.stride(0), x.stride(1), *w_strides, *bt_strides, *at_strides,
        row_block.stride(0), col_block.stride(0), y.stride(0), y.stride(1),
        float(scale),
        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_I=block_i, R_PAD=r_pad, GROUP_T=8,
        INCLUDE_BASE=include_base, HAS_BIAS=bias is not None,
        ACC_DTYPE=acc_tl, DOT_DTYPE=dot_tl, DOT_PRECISION=precision, MOD_PRECISION=mod_precision,
        num_warps=num_warps,
    )
    return y


def _factors_in_original_order(b_packed, a_packed, parts):
    # Small gathers (out × R, R × in): the forward kernel then reads Bt / At without index indirection.
    return b_packed.index_select(0, parts.inv_row_perm), a_packed.index_select(1, parts.inv_col_perm)


def _forward_triton(x, weight, bias, b_packed, a_packed, index, block_sizes, scale, include_base):
    parts = _unpack(index, block_sizes)
    bt, at = _factors_in_original_order(b_packed, a_packed, parts)
    return _launch_modulated_gemm(x, weight, tuple(weight.stride()), bt, tuple(bt.stride()), at, tuple(at.stride()),
                                  parts.row_block, parts.col_block, bias, scale, include_base, weight.shape[0],
                                  b_packed.shape[1])


def _grad_x_triton(grad_y, weight, b_packed, a_packed, parts, scale, include_base):
    """grad_x = G (c·W + ΔW): the forward kernel with W → Wᵀ, Bt ↔ Atᵀ, row blocks ↔ column blocks."""
    bt, at = _factors_in_original_order(b_packed, a_packed, parts)
    w_t = (weight.stride(1), weight.stride(0))
    return _launch_modulated_gemm(grad_y, weight, w_t, at, (at.stride(1), at.stride(0)),
                                  bt, (bt.stride(1), bt.stride(0)), parts.col_block, parts.row_block, None, scale,
                                  include_base, weight.shape[1], b_packed.shape[1])


def _factor_grads_triton(grad_y, x, weight, b_packed, a_packed, parts, block_sizes, scale):
    import triton

    from ._triton_smoa_bwd import smoa_factor_grad_kernel, tile_sizes

    num_blocks = len(block_sizes) // 2
    rank = b_packed.shape[1]
    acc_torch, acc_tl, dot_tl, precision, factor_precision = _dtypes_for(grad_y, x)
    db = torch.zeros(b_packed.shape, dtype=acc_torch, device=x.device)
    da = torch.zeros(a_packed.shape, dtype=acc_torch, device=x.device)
    max_rows, max_cols = max(block_sizes[:num_blocks]), max(block_sizes[num_blocks:])
    if rank == 0 or max_rows == 0 or max_cols == 0 or x.shape[0] == 0:
        return db, da
    block_o, block_i, block_t, num_warps = tile_sizes(x.element_size())
    r_pad = max(16, triton.next_power_of_2(rank))
    grid = (triton.cdiv(max_cols, block_i), triton.cdiv(max_rows, block_o), num_blocks)
    smoa_factor_grad_kernel[grid](
        grad_y, x, weight, parts.row_perm, parts.col_perm, parts.row_ptr, parts.col_ptr, b_packed, a_packed, db, da,
        x.shape[0], rank,
        grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        b_packed.stride(0), b_packed.stride(1), a_packed.stride(0), a_packed.stride(1),
        db.stride(0), db.stride(1), da.stride(0), da.stride(1),
        float(scale),
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, R_PAD=r_pad,
        ACC_DTYPE=acc_tl, DOT_DTYPE=dot_tl, DOT_PRECISION=precision, FACTOR_PRECISION=factor_precision,
        num_warps=num_warps,
    )
    return db, da


# ------------------------------------------------------------------------------------------ custom ops
def smoa_linear_backend(x: torch.Tensor, rank: int, backend: str | None = None) -> Choice:
    """The registry's choice for an input like ``x`` and a packed rank ``rank``."""
    return backend_of("smoa_linear", x, backend=backend, rank=rank)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, b_packed: torch.Tensor,
             a_packed: torch.Tensor, index: torch.Tensor, block_sizes: list[int], scale: float,
             include_base: bool) -> torch.Tensor:
    if smoa_linear_backend(x, b_packed.shape[1]) == "triton":
        return _forward_triton(x, weight, bias, b_packed, a_packed, index, block_sizes, scale, include_base)
    return _forward_torch(x, weight, bias, b_packed, a_packed, index, block_sizes, scale, include_base)


_smoa_linear_op = torch.library.custom_op("spectralkern::smoa_linear", _forward, mutates_args=())


@_smoa_linear_op.register_fake
def _(x, weight, bias, b_packed, a_packed, index, block_sizes, scale, include_base):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _backward_outputs(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, b_packed: torch.Tensor,
                      a_packed: torch.Tensor, index: torch.Tensor, block_sizes: list[int], scale: float,
                      include_base: bool, need_x: bool, need_w: bool,
                      need_factors: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_b_packed, grad_a_packed); the ones not asked for are empty tensors."""
    if smoa_linear_backend(grad_y, b_packed.shape[1]) == "triton":
        parts = _unpack(index, block_sizes)
        dx = _grad_x_triton(grad_y, weight, b_packed, a_packed, parts, scale, include_base) if need_x else None
        db, da = (_factor_grads_triton(grad_y, x, weight, b_packed, a_packed, parts, block_sizes, scale)
                  if need_factors else (None, None))
        dw = (_backward_reference(grad_y, x, weight, b_packed, a_packed, index, block_sizes, scale, include_base,
                                  False, True, False)[1] if need_w else None)  # frozen in SMoA: no fused path
    else:
        dx, dw, db, da = _backward_torch(grad_y, x, weight, b_packed, a_packed, index, block_sizes, scale,
                                         include_base, need_x, need_w, need_factors)
    # Outputs of a custom op may not alias each other: a fresh empty tensor for each one not asked for.
    return (dx.to(x.dtype).contiguous() if need_x else grad_y.new_empty(0),
            dw.to(weight.dtype).contiguous() if need_w else grad_y.new_empty(0),
            db.to(b_packed.dtype).contiguous() if need_factors else grad_y.new_empty(0),
            da.to(a_packed.dtype).contiguous() if need_factors else grad_y.new_empty(0))


_smoa_linear_backward_op = torch.library.custom_op("spectralkern::smoa_linear_backward", _backward_outputs,
                                                   mutates_args=())


@_smoa_linear_backward_op.register_fake
def _(grad_y, x, weight, b_packed, a_packed, index, block_sizes, scale, include_base, need_x, need_w, need_factors):
    # grad_x has grad_y's row count: x is a (0, in) placeholder when only grad_x is asked for.
    return (x.new_empty((grad_y.shape[0], weight.shape[1])) if need_x else grad_y.new_empty(0),
            weight.new_empty(weight.shape) if need_w else grad_y.new_empty(0),
            b_packed.new_empty(b_packed.shape) if need_factors else grad_y.new_empty(0),
            a_packed.new_empty(a_packed.shape) if need_factors else grad_y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, b_packed, a_packed, index, block_sizes, scale, include_base = inputs
    ctx.block_sizes, ctx.scale, ctx.include_base = block_sizes, scale, include_base
    ctx.need_x, ctx.need_w, ctx.need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    ctx.need_factors = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    # x is read only by the factor and weight gradients.
    ctx.save_for_backward(x if (ctx.need_factors or ctx.need_w) else None, weight, b_packed, a_packed, index)


def _backward(ctx, grad_y, run_backward=torch.ops.spectralkern.smoa_linear_backward):
    x, weight, b_packed, a_packed, index = ctx.saved_tensors
    dx, dw, db, da = run_backward(
        grad_y, x if x is not None else grad_y.new_empty(0, weight.shape[1]), weight, b_packed, a_packed, index,
        ctx.block_sizes, ctx.scale, ctx.include_base, ctx.need_x, ctx.need_w, ctx.need_factors)
    dbias = grad_y.sum(0) if ctx.need_bias else None
    return (dx if ctx.need_x else None, dw if ctx.need_w else None, dbias,
            db if ctx.need_factors else None, da if ctx.need_factors else None, None, None, None, None)


_smoa_linear_op.register_autograd(_backward, setup_context=_setup_context)


# the eager entry (see ``_eager.eager_autograd``); under torch.compile the custom op runs, opaque to the compiler
_eager_smoa_linear = eager_autograd("EagerSMoALinear", _forward, _setup_context,
                                    lambda ctx, grad_y: _backward(ctx, grad_y, run_backward=_backward_outputs))


# ------------------------------------------------------------------------------------------ public API
def smoa_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, b_packed: torch.Tensor,
                a_packed: torch.Tensor, layout: SMoALayout, scale: float, include_base: bool = True) -> torch.Tensor:
    """y = x (c·W + ΔW)ᵀ + bias, ΔW = SMoA's block-diagonal Hadamard-modulated update, never materialised.

    Args:
        x: (..., in) float16/bfloat16/float32/float64, any strides.
        weight: (out, in), the frozen base weight (also the anchor of every block). A (in, out) HF Conv1D weight
            can be passed as ``weight.T``.
        bias: (out,) or None; added as is.
        b_packed: (out, R) rows in the layout's permuted order; SMoA's per-block B_k packed block-diagonally.
        a_packed: (R, in) columns in the layout's permuted order; A_k packed block-diagonally.
        layout: the blocks (``SMoALayout``) on x's device.
        scale: s (alpha / r in SMoA).
        include_base: c = 1 adds the base product x Wᵀ from the same GEMM; c = 0 gives the update alone.
    Returns:
        (..., out) in x's dtype. Differentiable w.r.t. x, weight, bias, b_packed and a_packed (accumulation in
        fp32, fp64 for fp64 inputs).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("b_packed", b_packed, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("a_packed", a_packed, ndim=2, dtypes=FLOAT_DTYPES)
    if not isinstance(layout, SMoALayout):
        raise TypeError(f"layout must be an SMoALayout, got {type(layout).__name__}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features = {in_features} (weight is "
                         f"{tuple(weight.shape)}), got shape {tuple(x.shape)}")
    if (layout.out_features, layout.in_features) != (out_features, in_features):
        raise ValueError(f"layout covers a ({layout.out_features}, {layout.in_features}) weight, but weight has "
                         f"shape {tuple(weight.shape)}")
    rank = b_packed.shape[1]
    if tuple(b_packed.shape) != (out_features, rank) or tuple(a_packed.shape) != (rank, in_features):
        raise ValueError(f"b_packed must be (out, R) and a_packed (R, in) with out = {out_features}, in = "
                         f"{in_features}; got {tuple(b_packed.shape)} and {tuple(a_packed.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        check_same_device("bias", bias, "x", x)
    for name, t in (("weight", weight), ("b_packed", b_packed), ("a_packed", a_packed), ("layout.index", layout.index)):
        check_same_device(name, t, "x", x)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    lead = x.shape[:-1]
    op = torch.ops.spectralkern.smoa_linear if torch.compiler.is_compiling() else _eager_smoa_linear
    y = op(x.reshape(-1, in_features), weight, bias, b_packed, a_packed, layout.index, layout.block_sizes,
           float(scale), bool(include_base))
    return y.reshape(*lead, out_features)

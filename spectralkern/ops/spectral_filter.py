"""spectral_filter: y = h·x + U diag(g − h) Uᵀ x, block by block, as one torch custom op.

Layers: the plain-torch reference (a loop over blocks: the float64 oracle), the torch backend (the blocks as
one batch: (B, n, ·) views for uniform blocks, zero-padded to the largest block for ragged ones, or the loop —
the registry's cost model picks), the Triton and compiled-CUDA (csrc/) launchers, and the custom ops
``spectralkern::spectral_filter`` / ``spectralkern::spectral_filter_backward`` with fake and autograd registrations
so the op works under autograd and torch.compile. ``spectral_filter_backend`` asks the registry (``_backend``)
which runs. The public entry point is ``spectral_filter(x, basis, gains, passthrough)``.
"""
from __future__ import annotations

import math
import weakref

import torch

from .. import _extensions
from .._backend import Choice, backend_of
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..basis import SpectralBasis
from ._eager import plain_eager_call


# ------------------------------------------------------------------------------------------ torch reference
def spectral_filter_reference(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
                              passthrough: float = 0.0) -> torch.Tensor:
    """Plain-torch y = h·x + U_b diag(g_b − h) U_bᵀ x_b per block (a loop over blocks).

    Shapes: x (N, d), U (N, k), block_ptr (B+1,), gains (B, k) -> y (N, d) in x's dtype. Computes in fp32 for
    half-precision inputs and in fp64 for fp64 inputs.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xs, Us, gs = x.to(acc), U.to(acc), gains.to(acc)
    y = passthrough * xs
    offsets = block_ptr.tolist()
    for b, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        if stop > start:
            U_b = Us[start:stop]
            y[start:stop] += U_b @ ((gs[b] - passthrough).unsqueeze(1) * (U_b.T @ xs[start:stop]))
    return y.to(x.dtype)


def spectral_filter_gains_grad_reference(grad_y: torch.Tensor, x: torch.Tensor, U: torch.Tensor,
                                         block_ptr: torch.Tensor) -> torch.Tensor:
    """d⟨grad_y, y⟩/d gains: (B, k), entry (b, j) = Σ_columns (U_bᵀ grad_y_b)_j (U_bᵀ x_b)_j."""
    acc = torch.promote_types(x.dtype, torch.float32)
    gys, xs, Us = grad_y.to(acc), x.to(acc), U.to(acc)
    offsets = block_ptr.tolist()
    out = torch.zeros(len(offsets) - 1, U.shape[1], dtype=acc, device=x.device)
    for b, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        if stop > start:
            U_b = Us[start:stop]
            out[b] = ((U_b.T @ gys[start:stop]) * (U_b.T @ xs[start:stop])).sum(dim=1)
    return out


# ------------------------------------------------------------------------------------------ torch backend
def _padded_rows(block_ptr: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """(rows (N,): where row i sits in the (B·n_max, ·) padded layout, n_max)."""
    sizes = block_ptr[1:] - block_ptr[:-1]
    n_max = int(sizes.max())
    starts = block_ptr[:-1]
    shift = torch.arange(sizes.numel(), device=block_ptr.device) * n_max - starts  # padded start − real start
    rows = torch.arange(int(block_ptr[-1]), device=block_ptr.device) + torch.repeat_interleave(shift, sizes)
    return rows.to(device), n_max


def _as_batch(t: torch.Tensor, num_blocks: int, acc: torch.dtype,
              padded: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """t (N, c) as (B, n, c): a view of uniform blocks (``padded`` None), else a zero-padded copy."""
    t = t if t.dtype == acc else t.to(acc)
    if padded is None:
        return t.view(num_blocks, -1, t.shape[1]) if t.is_contiguous() else t.unflatten(0, (num_blocks, -1))
    rows, n_max = padded
    out = t.new_zeros(num_blocks * n_max, t.shape[1])
    return out.index_copy_(0, rows, t).unflatten(0, (num_blocks, n_max))


def _filter_loop(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
                 passthrough: float, acc: torch.dtype) -> torch.Tensor:
    """Two GEMMs per block, the second writing y_b = h·x_b + U_b c_b in place (addmm)."""
    xs, Us, coef = x.to(acc), U.to(acc), gains.to(acc) - passthrough
    y = torch.empty_like(xs) if xs.is_contiguous() else torch.empty(xs.shape, dtype=acc, device=x.device)
    offsets = block_ptr.tolist()
    for b, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        if stop > start:
            U_b, x_b = Us[start:stop], xs[start:stop]
            torch.addmm(x_b, U_b, (U_b.T @ x_b).mul_(coef[b].unsqueeze(1)), beta=passthrough, out=y[start:stop])
    return y


def filter_torch(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
                 passthrough: float, algorithm: str, *, saved_x: torch.Tensor | None = None,
                 write_y: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch backend, same contract as the launchers: (y (N, d) contiguous, or empty when not ``write_y``;
    the gains' gradient Σ_cols (U_bᵀ x_b)(U_bᵀ saved_b) (B, k) when ``saved_x`` is given, else None).

    ``algorithm`` (the registry's): "batched" — uniform blocks as (B, n, ·) views, two bmm; "padded" — ragged
    blocks zero-padded to the largest (padded rows of U are zero, so they add nothing); "loop" — two GEMMs per
    block. Accumulates in fp32 (fp64 for fp64 inputs).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_blocks, k = block_ptr.numel() - 1, U.shape[1]
    if x.numel() == 0:  # no nodes (so only empty blocks) or no columns
        y = (passthrough * x.to(acc)).to(x.dtype).contiguous() if write_y else x.new_empty(0)
        return y, (torch.zeros(num_blocks, k, dtype=acc, device=x.device) if saved_x is not None else None)
    if algorithm == "loop":
        y = _filter_loop(x, U, block_ptr, gains, passthrough, acc).to(x.dtype) if write_y else x.new_empty(0)
        grads = (spectral_filter_gains_grad_reference(x, saved_x, U, block_ptr) if saved_x is not None else None)
        return y, grads
    padded = _padded_rows(block_ptr, x.device) if algorithm == "padded" else None
    U3 = _as_batch(U, num_blocks, acc, padded)                             # (B, n, k)
    x3 = _as_batch(x, num_blocks, acc, padded)                             # (B, n, d)
    coef = torch.bmm(U3.transpose(1, 2), x3)                              # (B, k, d) = U_bᵀ x_b
    grads = None
    if saved_x is not None:
        saved_coef = torch.bmm(U3.transpose(1, 2), _as_batch(saved_x, num_blocks, acc, padded))
        grads = (coef * saved_coef).sum(dim=2)
    if not write_y:
        return x.new_empty(0), grads
    # (g − h) scales U_b's columns (n·k products) rather than the coefficients (k·d): y_b = (U_b diag(g − h)) c_b
    scale = gains if gains.dtype == acc else gains.to(acc)
    U3g = U3 * (scale - passthrough if passthrough != 0.0 else scale).unsqueeze(1)
    y3 = torch.baddbmm(x3, U3g, coef, beta=passthrough) if passthrough != 0.0 else torch.bmm(U3g, coef)
    y = y3.flatten(0, 1) if padded is None else y3.flatten(0, 1).index_select(0, padded[0])
    return (y if y.dtype == x.dtype else y.to(x.dtype)), grads


# ------------------------------------------------------------------------------------------ native launcher
_NATIVE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``, row-major contiguous (itself when it already is)."""
    t = t if t.dtype == dtype else t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _launch_native(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
                   passthrough: float, *, saved_x: torch.Tensor | None = None, write_y: bool = True,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The compiled CPU kernel (csrc/native/spectral_filter.cpp); the same contract as ``_launch_triton``.

    float32 / float64 on the CPU: per (block, 16-column tile) the coefficients of 8 basis vectors at a time stay in
    registers; x (and saved_x) are read once per 8 vectors, y written once. Blocks split across torch's thread
    count when the work is large enough to pay for starting threads.
    """
    ext = _extensions.module("native")
    n, d = x.shape
    k = U.shape[1]
    num_blocks = block_ptr.numel() - 1
    dtype = x.dtype
    x_c = _dense(x, dtype)
    k_pad = -(-k // 8) * 8  # the kernel takes basis vectors 8 at a time: zero columns pad U and the gains
    if k_pad != k:
        U, gains = torch.nn.functional.pad(U, (0, k_pad - k)), torch.nn.functional.pad(gains, (0, k_pad - k))
    U_c, gains_c = _dense(U, dtype), _dense(gains, dtype)
    saved = _dense(saved_x, dtype) if saved_x is not None else None
    y = torch.empty((n, d) if write_y else (0, 0), dtype=dtype)
    grads = torch.zeros(num_blocks, k_pad, dtype=dtype) if saved is not None else None
    if n and d:
        ext.spectral_filter(_NATIVE_DTYPES[dtype], num_blocks, block_ptr.data_ptr(), d, k_pad, x_c.data_ptr(),
                            U_c.data_ptr(), gains_c.data_ptr(), float(passthrough), y.data_ptr() if write_y else 0,
                            saved.data_ptr() if saved is not None else 0,
                            grads.data_ptr() if grads is not None else 0, torch.get_num_threads())
    elif write_y:
        y.copy_(passthrough * x)
    if out is not None and write_y:
        out.copy_(y)
        y = out
    return y, (grads[:, :k] if grads is not None else None)


# ------------------------------------------------------------------------------------------ triton launcher
def _launch_triton(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
                   passthrough: float, *, saved_x: torch.Tensor | None = None, write_y: bool = True,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused kernel over all blocks × column tiles. Returns (y or empty, gains grad (B, k) or None).

    ``out``: an (N, d) tensor of x's dtype to write y into (any strides) instead of a new one.
    """
    import triton
    import triton.language as tl

    from ._triton_spectral_filter import num_warps, spectral_filter_kernel, tile_sizes

    n, d = x.shape
    k = U.shape[1]
    num_blocks = block_ptr.numel() - 1
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    k_pad = max(16, triton.next_power_of_2(k))
    block_n, block_d = tile_sizes(k_pad, fp64=acc == torch.float64)
    num_col_tiles = triton.cdiv(d, block_d)
    y = out if out is not None else torch.empty((n, d) if write_y else (0, 0), dtype=x.dtype, device=x.device)
    gain_grad = saved_x is not None
    partial = torch.empty((num_blocks, num_col_tiles, k_pad) if gain_grad else (0,), dtype=acc, device=x.device)
    if n == 0 or d == 0:  # nothing to launch (no nodes implies only empty blocks)
        return y, torch.zeros(num_blocks, k, dtype=acc, device=x.device) if gain_grad else None
    y_strides = y.stride() if write_y else (0, 0)
    saved = saved_x if gain_grad else x
    spectral_filter_kernel[(num_blocks, num_col_tiles)](
        x, U, gains, block_ptr, y, saved, partial,
        d, k, num_col_tiles,
        x.stride(0), x.stride(1), U.stride(0), U.stride(1), gains.stride(0), gains.stride(1),
        y_strides[0], y_strides[1], saved.stride(0), saved.stride(1),
        float(passthrough),
        BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
        # tf32x3 keeps fp32 inputs at ~fp32 accuracy on tensor cores; fp16/bf16 inputs take one tf32 pass: exact on
        # the x side, U (fp32) rounded to tf32 (2^-11, under the half output's rounding; docs/gpu.md).
        DOT_PRECISION="ieee" if acc == torch.float64 else ("tf32x3" if x.dtype == torch.float32 else "tf32"),
        HAS_PASSTHROUGH=passthrough != 0.0, WRITE_Y=write_y, GAIN_GRAD=gain_grad,
        num_warps=num_warps(k_pad, fp64=acc == torch.float64),
    )
    grads = partial.sum(dim=1)[:, :k] if gain_grad else None
    return y, grads


# ------------------------------------------------------------------------------------------ CUDA launcher
def _launch_cuda(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
                 passthrough: float, *, saved_x: torch.Tensor | None = None, write_y: bool = True,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The compiled kernels (csrc/) over all blocks × column tiles; the same contract as ``_launch_triton``.

    x (and saved_x) float32/float16/bfloat16, any strides; U and gains are read as float32 (converted here when
    they are not), block_ptr as int64 on x's device. The kernel runs on torch's current stream of x's device and
    writes into torch-allocated memory; the gains' gradient comes back as per-tile partial sums, added up here.
    """
    from ._cuda_args import tensor_desc

    ext = _extensions.module("cuda")
    n, d = x.shape
    k = U.shape[1]
    num_blocks = block_ptr.numel() - 1
    y = out if out is not None else torch.empty((n, d) if write_y else (0, 0), dtype=x.dtype, device=x.device)
    gain_grad = saved_x is not None
    if n == 0 or d == 0:  # nothing to launch (no nodes implies only empty blocks)
        return y, torch.zeros(num_blocks, k, dtype=torch.float32, device=x.device) if gain_grad else None
    U32, gains32 = U.to(torch.float32), gains.to(torch.float32)
    offsets = block_ptr.to(device=x.device, dtype=torch.int64).contiguous()  # the kernel indexes it densely
    saved = saved_x.to(x.dtype) if gain_grad else None
    partial = (torch.empty((num_blocks, -(-d // ext.TILE_D), k), dtype=torch.float32, device=x.device)
               if gain_grad else None)
    with torch.cuda.device(x.device):
        ext.spectral_filter(
            x=tensor_desc(x), U=tensor_desc(U32), gains=tensor_desc(gains32),
            block_ptr=(offsets.data_ptr(), offsets.numel()), y=tensor_desc(y) if write_y else None,
            saved_x=tensor_desc(saved) if gain_grad else None,
            gain_grad=(partial.data_ptr(), partial.numel()) if gain_grad else None,
            dtype=ext.DTYPES[str(x.dtype).removeprefix("torch.")], passthrough=float(passthrough),
            device=x.device.index, stream=torch.cuda.current_stream(x.device).cuda_stream)
    return y, partial.sum(dim=1) if gain_grad else None


# ------------------------------------------------------------------------------------------ custom ops
# Layout facts per block_ptr tensor (the same object every call: SpectralBasis.block_ptr_on caches it), keyed by
# id and in-place version and checked by a weak reference: a host read of block_ptr per call costs µs.
_LAYOUTS: dict[tuple[int, int], tuple[weakref.ref, dict[str, object]]] = {}
_LAYOUTS_KEEP = 256


def block_layout_facts(block_ptr: torch.Tensor) -> dict[str, object]:
    """The registry's layout facts of block offsets (B+1,): rows, blocks, max_block, uniform (all the same size,
    none empty), ragged (not uniform)."""
    key = (id(block_ptr), block_ptr._version)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is block_ptr:
        return hit[1]
    offsets = block_ptr.tolist()
    sizes = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    largest = max(sizes, default=0)
    uniform = largest > 0 and min(sizes) == largest
    facts = {"rows": offsets[-1], "blocks": len(sizes), "max_block": largest, "uniform": uniform,
             "ragged": not uniform}
    if len(_LAYOUTS) >= _LAYOUTS_KEEP:
        _LAYOUTS.clear()
    try:
        _LAYOUTS[key] = (weakref.ref(block_ptr), facts)
    except TypeError:  # a tensor type without weak references (tracing): no cache
        pass
    return facts


def spectral_filter_backend(x: torch.Tensor, k: int, block_ptr: torch.Tensor | None = None,
                            backend: str | None = None, algorithm: str | None = None) -> Choice:
    """The registry's choice for filtering an input like ``x`` with a basis of ``k`` columns; with ``block_ptr``
    also the torch backend's algorithm (batched / padded / loop)."""
    facts = block_layout_facts(block_ptr) if block_ptr is not None else {}
    d = x.shape[1] if x.dim() == 2 else 1
    return backend_of("spectral_filter", x, k=k, d=d, backend=backend, algorithm=algorithm, **facts)


def _forward(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
             passthrough: float) -> torch.Tensor:
    """The op's forward on the registry's backend (and algorithm)."""
    choice = spectral_filter_backend(x, U.shape[1], block_ptr)
    if choice.backend == "cuda":
        return _launch_cuda(x, U, block_ptr, gains, passthrough)[0]
    if choice.backend == "triton":
        return _launch_triton(x, U, block_ptr, gains, passthrough)[0]
    if choice.backend == "native":
        return _launch_native(x, U, block_ptr, gains, passthrough)[0]
    return filter_torch(x, U, block_ptr, gains, passthrough, choice.algorithm)[0]


@torch.library.custom_op("spectralkern::spectral_filter", mutates_args=())
def _spectral_filter_op(x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor, gains: torch.Tensor,
                        passthrough: float) -> torch.Tensor:
    return _forward(x, U, block_ptr, gains, passthrough)


@_spectral_filter_op.register_fake
def _(x, U, block_ptr, gains, passthrough):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("spectralkern::spectral_filter_backward", mutates_args=())
def _spectral_filter_backward_op(grad_y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, block_ptr: torch.Tensor,
                                 gains: torch.Tensor, passthrough: float, need_x_grad: bool,
                                 need_gains_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x (N, d) or empty, grad_gains (B, k) or empty). ``x`` is only read when need_gains_grad."""
    empty = grad_y.new_empty(0)
    choice = spectral_filter_backend(grad_y, U.shape[1], block_ptr)
    launch = {"cuda": _launch_cuda, "triton": _launch_triton, "native": _launch_native}.get(choice.backend)
    if launch is not None:
        grad_x, grad_gains = launch(grad_y, U, block_ptr, gains, passthrough,
                                    saved_x=x if need_gains_grad else None, write_y=need_x_grad)
    else:
        grad_x, grad_gains = filter_torch(grad_y, U, block_ptr, gains, passthrough, choice.algorithm,
                                          saved_x=x if need_gains_grad else None, write_y=need_x_grad)
    grad_x = grad_x.contiguous() if need_x_grad else empty
    grad_gains = grad_gains.to(gains.dtype).contiguous() if need_gains_grad else gains.new_empty(0)
    return grad_x, grad_gains


@_spectral_filter_backward_op.register_fake
def _(grad_y, x, U, block_ptr, gains, passthrough, need_x_grad, need_gains_grad):
    grad_x = torch.empty_like(grad_y, memory_format=torch.contiguous_format) if need_x_grad else grad_y.new_empty(0)
    grad_gains = gains.new_empty(gains.shape) if need_gains_grad else gains.new_empty(0)
    return grad_x, grad_gains


def _setup_context(ctx, inputs, output):
    x, U, block_ptr, gains, passthrough = inputs
    ctx.passthrough = passthrough
    ctx.need_x_grad = ctx.needs_input_grad[0]
    ctx.need_gains_grad = ctx.needs_input_grad[3]
    # x is only needed for the gains' gradient.
    ctx.save_for_backward(x if ctx.need_gains_grad else None, U, block_ptr, gains)


def _backward(ctx, grad_y):
    x, U, block_ptr, gains = ctx.saved_tensors
    grad_x, grad_gains = torch.ops.spectralkern.spectral_filter_backward(
        grad_y, x if x is not None else grad_y.new_empty(0), U, block_ptr, gains, ctx.passthrough,
        ctx.need_x_grad, ctx.need_gains_grad)
    return (grad_x if ctx.need_x_grad else None, None, None,
            grad_gains if ctx.need_gains_grad else None, None)


_spectral_filter_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ public API
def filter_gradient(grad: torch.Tensor, basis: SpectralBasis, gains: torch.Tensor,
                    passthrough: float = 0.0) -> torch.Tensor:
    """The filter without input checks or autograd, for optimizers: grad (N, d) on the basis' device, gains (B, k)
    -> a new (N, d) tensor in grad's dtype, on the registry's backend."""
    return _forward(grad, basis.U, basis.block_ptr_on(grad.device), gains, float(passthrough))



def spectral_filter(x: torch.Tensor, basis: SpectralBasis, gains: torch.Tensor,
                    passthrough: float = 0.0) -> torch.Tensor:
    """Filter x along its node dimension in the spectral basis of each block.

        y_b = h·x_b + U_b diag(g_b − h) U_bᵀ x_b,     h = passthrough

    Args:
        x: (N, d) or (N,), float16/bfloat16/float32/float64, any strides. N = basis.num_nodes.
        basis: the SpectralBasis (U of shape (N, k), B blocks).
        gains: (B, k) per-block gains or (k,) shared by all blocks, e.g. ``filters.heat(1.0)(basis.eigenvalues)``;
            differentiable (learnable filters). Entries past a block's k_b = min(k, n_b) have no effect.
        passthrough: h, the gain of the frequencies the basis does not hold (0: pure low-pass projection).
            A constant, not differentiated.
    Returns:
        y with x's shape and dtype (contiguous). Differentiable w.r.t. x and gains; accumulation is fp32
        (fp64 for fp64 inputs).
    """
    if not isinstance(basis, SpectralBasis):
        raise TypeError(f"basis must be a SpectralBasis, got {type(basis).__name__}")
    check_tensor("x", x, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    if x.shape[0] != basis.num_nodes:
        raise ValueError(f"x must have {basis.num_nodes} rows (the basis has {basis.num_nodes} nodes), "
                         f"got shape {tuple(x.shape)}")
    check_same_device("x", x, "basis.U", basis.U)
    check_tensor("gains", gains, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    check_same_device("gains", gains, "basis.U", basis.U)
    num_blocks, k = basis.num_blocks, basis.k
    if gains.dim() == 1 and gains.shape[0] != k:
        raise ValueError(f"gains of shape (k,) must have k = {k} entries (the basis' k), got shape {tuple(gains.shape)}")
    if gains.dim() == 2 and tuple(gains.shape) != (num_blocks, k):
        raise ValueError(f"gains must have shape (B, k) = ({num_blocks}, {k}) or (k,) = ({k},), "
                         f"got {tuple(gains.shape)}")
    if isinstance(passthrough, bool) or not isinstance(passthrough, (int, float)) or not math.isfinite(passthrough):
        raise TypeError(f"passthrough must be a finite float, got {passthrough!r}")
    vector = x.dim() == 1
    x2 = x.unsqueeze(1) if vector else x
    gains2 = gains.expand(num_blocks, k) if gains.dim() == 1 else gains  # autograd sums a (k,)'s gradient back
    if not basis.holds_every_column:  # padding columns: no effect, even NaN (U is 0 there)
        gains2 = gains2.where(basis.held_on(x.device), 0)
    block_ptr = basis.block_ptr_on(x.device)
    if plain_eager_call(x2, gains2, basis.U):  # the custom op's dispatch costs as much as a small filter
        y = _forward(x2, basis.U, block_ptr, gains2, float(passthrough))
    else:
        y = torch.ops.spectralkern.spectral_filter(x2, basis.U, block_ptr, gains2, float(passthrough))
    return y.squeeze(1) if vector else y

"""chebyshev_filter: y = g(L) x ≈ Σ_{m=0..K} c_m T_m(L̃) x with L̃ = 2L/λ_max − I, no eigendecomposition.

Three layers, as for spectral_filter: the plain-torch reference (the eager recursion with ``torch.sparse.mm``),
the torch backend's two algorithms and the two Triton launchers, and the custom ops
``spectralkern::chebyshev_filter`` / ``spectralkern::chebyshev_filter_backward`` with fake and autograd
registrations (what torch.compile traces; eager calls run the same functions through a plain autograd.Function,
``_eager.eager_autograd``, without the dispatcher's Python layers).

Which algorithm runs on the torch backend (the registry's cost model, ``_chebyshev_cost``):
    recursion       K CSR products over all of x (any graph; every pass that needs the coefficients' gradient)
    materialized    block-diagonal graphs: P_b = p(Ã_b) per block, then y_b = P_b x_b (``_chebyshev_dense``);
                    wins when d is large next to K·n_b²/(nnz/N)

Which kernel runs (triton backend; the registry's algorithms of ``chebyshev_filter``, ``_backend.OPS``):
    block-diagonal graph, blocks of ≤ 256 nodes   kernel 1 (``_triton_chebyshev_block``): all K steps per
                                                   (block, column tile) in one launch, x read once, y written
                                                   once. When d is large next to K·n_b it first materialises
                                                   P_b = p(Ã_b) and then applies y_b = P_b x_b (see below).
    cross-block edges, or a block of > 256 nodes   kernel 2 (``_triton_chebyshev_step``): K launches, each one
                                                   fused CSR SpMM + recurrence + accumulation.

The op's graph inputs are the Laplacian's CSR arrays with the values pre-scaled by 2/λ_max (so L̃ = L̂ − I with
L̂ = 2L/λ_max) and, for kernel 1, Ã in a packed ragged layout (N, n_pad): row i is node i, column j the j-th
node of its block. Both are built once per (Laplacian, λ_max, dtype) and cached on the GraphLaplacian.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .._backend import OPS, Choice, algorithm_of, backend_of
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..filters import chebyshev_coefficients
from ..graph import GraphLaplacian
from ..lambda_max import check_lambda_max, estimate_lambda_max
from . import _chebyshev_dense
from ._accumulation import accumulation_dtype as _acc_dtype
from ._eager import eager_autograd

_PREPARED_ATTR = "_chebyshev_prepared"
_GROUPS_ATTR = "_chebyshev_groups"
_PREPARED_KEEP = 4  # (λ_max, dtype, layout) entries kept per Laplacian
#: every algorithm ``chebyshev_filter(algorithm=)`` may force (which backend has which: ``_backend.OPS``)
ALGORITHMS = tuple(a.name for a in OPS["chebyshev_filter"].algorithms)


# ------------------------------------------------------------------------------------------ torch reference
def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, (n, n))


def _recursion(x: torch.Tensor, order: int, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor):
    """Yield T_0 x, T_1 x, ..., T_K x in the accumulation dtype (eager: one torch.sparse.mm per step)."""
    acc = _acc_dtype(x.dtype)
    t_prev = x.to(acc)
    yield t_prev
    if order == 0:
        return
    scaled = _csr(crow, col, val.to(acc), x.shape[0])
    t_cur = torch.sparse.mm(scaled, t_prev) - t_prev
    yield t_cur
    for _ in range(2, order + 1):
        t_prev, t_cur = t_cur, 2.0 * (torch.sparse.mm(scaled, t_cur) - t_cur) - t_prev
        yield t_cur


def chebyshev_recursion_reference(x: torch.Tensor, coeffs: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                                  val: torch.Tensor) -> torch.Tensor:
    """Plain-torch y = Σ_m c_m T_m(L̂ − I) x, with L̂ = 2L/λ_max given as CSR (crow, col, val).

    Shapes: x (N, d), coeffs (K+1,) -> y (N, d) in x's dtype; computed in fp32 (fp64 for fp64 x).
    """
    acc = _acc_dtype(x.dtype)
    c = coeffs.to(acc)
    if x.numel() == 0:
        return torch.zeros_like(x)
    y = torch.zeros(x.shape, dtype=acc, device=x.device)
    for m, t in enumerate(_recursion(x, coeffs.numel() - 1, crow, col, val)):
        y += c[m] * t
    return y.to(x.dtype)


def chebyshev_coeffs_grad_reference(grad_y: torch.Tensor, x: torch.Tensor, order: int, crow: torch.Tensor,
                                    col: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """d⟨grad_y, y⟩/d c_m = ⟨T_m grad_y, x⟩ (T_m(L̃) is symmetric): (K+1,) in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    xs = x.to(acc)
    if x.numel() == 0:
        return torch.zeros(order + 1, dtype=acc, device=x.device)
    return torch.stack([(t * xs).sum() for t in _recursion(grad_y, order, crow, col, val)])


def chebyshev_filter_reference(x: torch.Tensor, L: GraphLaplacian, coeffs: torch.Tensor,
                               lambda_max: float) -> torch.Tensor:
    """The eager recursion on a GraphLaplacian: Σ_m c_m T_m(2L/λ_max − I) x (x of shape (N, d))."""
    acc = _acc_dtype(x.dtype)
    matrix = L.matrix
    val = matrix.values().to(acc) * (2.0 / lambda_max)
    return chebyshev_recursion_reference(x, coeffs, matrix.crow_indices(), matrix.col_indices(), val)


def _torch_recursion(x: torch.Tensor, coeffs: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                     saved: torch.Tensor | None, write_y: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The torch backend's recursion: y = Σ c_m T_m x (when ``write_y``) and, with ``saved``, the coefficients'
    gradient ⟨T_m x, saved⟩ from the same T_m (one pass for both). coeffs (K+1,) and val in the accumulation
    dtype, K ≥ 1. Each step is two ops: T_{m+1} = 2·L̂·T_m − (2·T_m + T_{m−1}) as one ``addmm_`` of the CSR L̂
    into (2·T_m + T_{m−1}), and y += c_m·T_m as one ``addcmul_`` (the reference's five passes cost ~1.5–2.5×)."""
    acc = coeffs.dtype
    order = coeffs.numel() - 1
    scaled = _csr(crow, col, val, x.shape[0])
    t_prev = x.to(acc).contiguous()
    t_cur = torch.addmm(t_prev, scaled, t_prev, beta=-1.0)  # T_1 = L̂x − x
    y = coeffs[0] * t_prev if write_y else None
    grad = torch.empty(order + 1, dtype=acc, device=x.device) if saved is not None else None
    other = saved.to(acc).reshape(-1) if saved is not None else None
    for m in range(order + 1):
        t = t_prev if m == 0 else t_cur
        if m > 1:
            t_prev, t_cur = t_cur, torch.add(t_prev, t_cur, alpha=2.0).addmm_(scaled, t_cur, beta=-1.0, alpha=2.0)
            t = t_cur
        if y is not None and m > 0:
            y.addcmul_(t, coeffs[m])
        if grad is not None:
            grad[m] = torch.dot(t.reshape(-1), other)
    return (y.to(x.dtype) if y is not None else None), grad


# ------------------------------------------------------------------------------------------ triton launchers
_UNIT_COEFFS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _apply_coeffs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(0, 1): T_1(P) x = P x, the apply pass of the materialised filter (cached: no host copy per call)."""
    key = (device, dtype)
    if key not in _UNIT_COEFFS:
        _UNIT_COEFFS[key] = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    return _UNIT_COEFFS[key]


def _run_block_kernel(x: torch.Tensor | None, blocks: torch.Tensor, coeffs: torch.Tensor, block_ptr: torch.Tensor,
                      out: torch.Tensor, d: int, dot_precision: str, saved: torch.Tensor | None = None,
                      write_y: bool = True) -> torch.Tensor | None:
    """One launch of kernel 1 over all blocks × column tiles; x None means the identity (d = n_pad columns).
    Returns the coefficient-gradient partials (B, tiles, K+1) when ``saved`` is given."""
    import triton
    import triton.language as tl

    from ._triton_chebyshev_block import chebyshev_block_kernel, tile_config

    order = coeffs.numel() - 1
    acc = blocks.dtype
    block_n = blocks.shape[1]
    num_blocks = block_ptr.numel() - 1
    block_d, block_k, warps = tile_config(block_n, fp64=acc == torch.float64)
    num_col_tiles = triton.cdiv(d, block_d)
    # T_m between steps: one row per node (x-sized), never touched when there is no third step.
    scratch = (torch.empty(blocks.shape[0] * num_col_tiles * block_d, dtype=acc, device=blocks.device)
               if order >= 2 else coeffs)
    partial = (torch.empty(num_blocks, num_col_tiles, order + 1, dtype=acc, device=blocks.device)
               if saved is not None else coeffs)
    x_arg = x if x is not None else blocks
    s_arg = saved if saved is not None else x_arg
    y_strides = out.stride() if write_y else (0, 0)
    chebyshev_block_kernel[(num_blocks, num_col_tiles)](
        blocks, x_arg, coeffs, block_ptr, out, s_arg, partial, scratch,
        d, order, num_col_tiles,
        blocks.stride(0), blocks.stride(1), x_arg.stride(0), x_arg.stride(1), y_strides[0], y_strides[1],
        s_arg.stride(0), s_arg.stride(1),
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, DOT_PRECISION=dot_precision,
        X_IDENTITY=x is None, WRITE_Y=write_y, COEF_GRAD=saved is not None, num_warps=warps,
    )
    return partial if saved is not None else None


def should_materialize(order: int, block_n: int, d: int) -> bool:
    """Whether the registry's cost model builds P_b = p(Ã_b) for a forward pass of this order on blocks padded to
    ``block_n`` and d columns (fewer FLOPs: K·n·n (build) + n·d (apply) < K·n·d per row)."""
    return algorithm_of("chebyshev_filter", "triton", order=order, block_n=block_n, d=d, block_layout=True,
                        forward=True) == "block-materialized"


def _launch_block(x: torch.Tensor, coeffs: torch.Tensor, blocks: torch.Tensor, block_ptr: torch.Tensor, *,
                  saved: torch.Tensor | None = None, write_y: bool = True, out: torch.Tensor | None = None,
                  materialize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel 1. x (N, d) any strides, coeffs (K+1,) acc dtype with K ≥ 1, blocks (N, n_pad) packed Ã.
    Returns (y or an empty tensor, coefficient gradient (K+1,) when ``saved`` is given)."""
    n, d = x.shape
    order = coeffs.numel() - 1
    acc = blocks.dtype
    fp64 = acc == torch.float64
    # tf32x3 keeps fp32 accuracy on tensor cores; T_m is not exact in TF32, so the recursion needs it for every
    # input dtype. The apply pass multiplies P by x: for fp16/bf16 x one TF32 rounding of P stays below the
    # output's own rounding.
    recursion_precision = "ieee" if fp64 else "tf32x3"
    apply_precision = "ieee" if fp64 else ("tf32x3" if x.dtype == torch.float32 else "tf32")
    y = out if out is not None else torch.empty((n, d) if write_y else (0, 0), dtype=x.dtype, device=x.device)
    if materialize is None:
        materialize = saved is None and should_materialize(order, blocks.shape[1], d)
    if materialize and saved is None:
        poly = torch.empty_like(blocks)  # P_b = p(Ã_b), same packed layout as Ã
        _run_block_kernel(None, blocks, coeffs, block_ptr, poly, blocks.shape[1], recursion_precision)
        _run_block_kernel(x, poly, _apply_coeffs(x.device, acc), block_ptr, y, d, apply_precision, write_y=write_y)
        return y, None
    partial = _run_block_kernel(x, blocks, coeffs, block_ptr, y, d, recursion_precision, saved=saved,
                                write_y=write_y)
    return y, (partial.sum(dim=(0, 1)) if partial is not None else None)


def _launch_csr(x: torch.Tensor, coeffs: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                *, saved: torch.Tensor | None = None, write_y: bool = True,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel 2: K launches. x (N, d), coeffs (K+1,) acc dtype with K ≥ 1, (crow, col, val) = CSR of 2L/λ_max.
    Returns (y or an empty tensor, coefficient gradient (K+1,) when ``saved`` is given)."""
    import triton
    import triton.language as tl

    from ._triton_chebyshev_step import chebyshev_step_kernel, tile_config

    n, d = x.shape
    order = coeffs.numel() - 1
    acc = val.dtype
    block_r, block_d, warps = tile_config(fp64=acc == torch.float64)
    grid = (triton.cdiv(n, block_r), triton.cdiv(d, block_d))
    num_programs = grid[0] * grid[1]
    x_c = x.contiguous()
    saved_c = saved.contiguous() if saved is not None else None
    y = out if out is not None else torch.empty((n, d) if write_y else (0, 0), dtype=x.dtype, device=x.device)
    if write_y and not y.is_contiguous():
        raise ValueError(f"out must be contiguous for the CSR kernel, got strides {y.stride()}")
    # T_m for m ≥ 1 lives in buffers[(m − 1) % 2]; from the third step on T_{m+1} overwrites T_{m−1} in place.
    buffers = [torch.empty(n, d, dtype=acc, device=x.device) for _ in range(min(order - 1, 2))]
    # y between steps, in the accumulation dtype (the last step writes y itself)
    y_acc = y if (not write_y or y.dtype == acc or order == 1) else torch.empty(n, d, dtype=acc, device=x.device)
    partial = torch.empty(order + 1, num_programs, dtype=acc, device=x.device) if saved is not None else val
    for step in range(order):
        last = step == order - 1
        t_cur = x_c if step == 0 else buffers[(step - 1) % 2]
        t_prev = x_c if step <= 1 else buffers[step % 2]
        t_next = buffers[step % 2] if not last else val  # the last T_K only feeds y
        y_out = y if last else y_acc
        chebyshev_step_kernel[grid](
            crow, col, val, t_cur, t_prev, t_next, y_acc, y_out if write_y else val,
            saved_c if saved_c is not None else x_c, partial, coeffs,
            n, d, step, num_programs,
            BLOCK_R=block_r, BLOCK_D=block_d, ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
            FIRST=step == 0, WRITE_T=not last, HAS_Y=write_y, COEF_GRAD=saved is not None, num_warps=warps,
        )
    return y, (partial.sum(dim=1) if saved is not None else None)


# ------------------------------------------------------------------------------------------ custom ops
def chebyshev_filter_backend(x: torch.Tensor | None = None, order: int | None = None, block_n: int = 0, *,
                             forward: bool = True, backend: str | None = None, algorithm: str | None = None,
                             dtype: torch.dtype | None = None, device: torch.device | None = None,
                             shape: tuple[int, ...] | None = None, nnz: int = 0,
                             groups: tuple[tuple[int, int], ...] | None = None) -> Choice:
    """The registry's choice for an input like ``x`` (or of this ``shape``, dtype and device); with ``order`` also
    the algorithm. Triton: ``block_n`` is the packed blocks' padded size (0: no block layout, the CSR kernel).
    Torch: ``nnz`` is L's stored entries, ``groups`` the ((G, n), ...) of the materialised form's dense block
    groups (None: the graph has none: cross-block edges, or over ``_chebyshev_dense.DENSE_MAX_BYTES``).
    ``forward``: no coefficient gradient in this pass. ``algorithm`` forces one (BackendUnavailable if it cannot
    run)."""
    facts = {}
    if order is not None:
        shape = tuple(x.shape) if x is not None else shape
        dtype_ = x.dtype if x is not None else dtype
        device_ = x.device if x is not None else torch.device(device)
        d = shape[1] if len(shape) == 2 else 1
        facts = {"order": order, "block_n": block_n, "d": d, "block_layout": block_n > 0, "forward": forward,
                 "nodes": shape[0], "nnz": nnz, "groups": groups or (), "dense_blocks": groups is not None,
                 "device_type": device_.type, "acc": _acc_dtype(dtype_)}
    return backend_of("chebyshev_filter", x, backend=backend, algorithm=algorithm, dtype=dtype, device=device,
                      **facts)


def _group_shapes(dense_blocks: list[torch.Tensor]) -> tuple[tuple[int, int], ...] | None:
    return tuple((int(b.shape[0]), int(b.shape[1])) for b in dense_blocks) if dense_blocks else None


def _forward(x: torch.Tensor, coeffs: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
             block_ptr: torch.Tensor, blocks: torch.Tensor, dense_blocks: list[torch.Tensor],
             dense_rows: list[torch.Tensor], algorithm: str | None, saved: torch.Tensor | None,
             write_y: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Filter x; with ``saved`` also return the coefficients' gradient ⟨T_m x, saved⟩ (x is grad_y then; the
    recursion runs, whatever ``algorithm`` forces)."""
    order = coeffs.numel() - 1
    acc = _acc_dtype(x.dtype)
    c = coeffs.to(acc).contiguous()
    if order == 0 or x.numel() == 0:  # g ≈ c_0: no graph work (and nothing to launch on empty tensors)
        y = (c[0] * x.to(acc)).to(x.dtype) if write_y else None
        grad = None
        if saved is not None:
            grad = torch.zeros(order + 1, dtype=acc, device=x.device)
            if x.numel():
                grad[0] = (x.to(acc) * saved.to(acc)).sum()
        return y, grad
    choice = chebyshev_filter_backend(x, order, blocks.shape[1] if blocks.numel() else 0, forward=saved is None,
                                      algorithm=algorithm if saved is None else None, nnz=val.numel(),
                                      groups=_group_shapes(dense_blocks))
    if choice.backend == "triton":
        if choice.algorithm == "csr":
            return _launch_csr(x, c, crow, col, val.to(acc), saved=saved, write_y=write_y)
        return _launch_block(x, c, blocks, block_ptr, saved=saved, write_y=write_y,
                             materialize=choice.algorithm == "block-materialized")
    if choice.algorithm == "materialized":  # only chosen without ``saved``: the x-only backward reuses P (= Pᵀ)
        return (_chebyshev_dense.apply(x, dense_blocks, dense_rows, c).to(x.dtype) if write_y else None), None
    return _torch_recursion(x, c, crow, col, val.to(acc), saved, write_y)


def _filter_output(x: torch.Tensor, coeffs: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                   val: torch.Tensor, block_ptr: torch.Tensor, blocks: torch.Tensor,
                   dense_blocks: list[torch.Tensor], dense_rows: list[torch.Tensor], algorithm: str) -> torch.Tensor:
    """y (N, d). dense_blocks / dense_rows: the materialised form's groups (``_chebyshev_dense.dense_groups``;
    empty lists when the graph has none); algorithm: "" (the registry's cost model) or one to force. (A required
    str, not Optional[str] = None: torch 2.13's autograd of ops with tensor-list inputs compares the backward's
    gradients against the arguments as passed, and the dispatcher drops a trailing default.)"""
    y, _ = _forward(x, coeffs, crow, col, val, block_ptr, blocks, dense_blocks, dense_rows, algorithm or None, None,
                    True)
    return y.contiguous()


_chebyshev_filter_op = torch.library.custom_op("spectralkern::chebyshev_filter", _filter_output, mutates_args=())


@_chebyshev_filter_op.register_fake
def _(x, coeffs, crow, col, val, block_ptr, blocks, dense_blocks, dense_rows, algorithm):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_outputs(grad_y: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor, crow: torch.Tensor,
                      col: torch.Tensor, val: torch.Tensor, block_ptr: torch.Tensor, blocks: torch.Tensor,
                      dense_blocks: list[torch.Tensor], dense_rows: list[torch.Tensor], need_x_grad: bool,
                      need_coeffs_grad: bool, algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x (N, d) or empty, grad_coeffs (K+1,) or empty). ``x`` is only read when need_coeffs_grad."""
    grad_x, grad_c = _forward(grad_y, coeffs, crow, col, val, block_ptr, blocks, dense_blocks, dense_rows,
                              algorithm or None, x if need_coeffs_grad else None, need_x_grad)
    grad_x = grad_x.contiguous() if need_x_grad else grad_y.new_empty(0)
    grad_c = grad_c.to(coeffs.dtype).contiguous() if need_coeffs_grad else coeffs.new_empty(0)
    return grad_x, grad_c


_chebyshev_filter_backward_op = torch.library.custom_op("spectralkern::chebyshev_filter_backward", _backward_outputs,
                                                        mutates_args=())


@_chebyshev_filter_backward_op.register_fake
def _(grad_y, x, coeffs, crow, col, val, block_ptr, blocks, dense_blocks, dense_rows, need_x_grad, need_coeffs_grad,
      algorithm):
    grad_x = torch.empty_like(grad_y, memory_format=torch.contiguous_format) if need_x_grad else grad_y.new_empty(0)
    grad_c = coeffs.new_empty(coeffs.shape) if need_coeffs_grad else coeffs.new_empty(0)
    return grad_x, grad_c


def _setup_context(ctx, inputs, output):
    x, coeffs, crow, col, val, block_ptr, blocks, dense_blocks, dense_rows, ctx.algorithm = inputs
    ctx.need_x_grad = ctx.needs_input_grad[0]
    ctx.need_coeffs_grad = ctx.needs_input_grad[1]
    ctx.num_groups = len(dense_blocks)
    # x is only needed for the coefficients' gradient.
    ctx.save_for_backward(x if ctx.need_coeffs_grad else None, coeffs, crow, col, val, block_ptr, blocks,
                          *dense_blocks, *dense_rows)


def _backward(ctx, grad_y, run_backward=torch.ops.spectralkern.chebyshev_filter_backward, list_grads: bool = True):
    x, coeffs, crow, col, val, block_ptr, blocks, *dense = ctx.saved_tensors
    grad_x, grad_c = run_backward(
        grad_y, x if x is not None else grad_y.new_empty(0), coeffs, crow, col, val, block_ptr, blocks,
        dense[:ctx.num_groups], dense[ctx.num_groups:], ctx.need_x_grad, ctx.need_coeffs_grad, ctx.algorithm)
    # The custom op's autograd wants the lists' structure back, one None per tensor; a plain Function one None.
    no_grads = [None] * ctx.num_groups if list_grads else None
    return (grad_x if ctx.need_x_grad else None, grad_c if ctx.need_coeffs_grad else None,
            None, None, None, None, None, no_grads, list(no_grads) if list_grads else None, None)


_chebyshev_filter_op.register_autograd(_backward, setup_context=_setup_context)

# the eager entry (see ``_eager.eager_autograd``); under torch.compile the custom op runs, opaque to the compiler
_eager_chebyshev_filter = eager_autograd(
    "EagerChebyshevFilter", _filter_output, _setup_context,
    lambda ctx, grad_y: _backward(ctx, grad_y, run_backward=_backward_outputs, list_grads=False))


# ------------------------------------------------------------------------------------------ graph preparation
def block_layout_fits(L: GraphLaplacian) -> bool:
    """True when kernel 1 can run: no cross-block edges and every block within its size limit."""
    from ._triton_chebyshev_block import MAX_BLOCK_NODES

    sizes = L.block_ptr[1:] - L.block_ptr[:-1]
    return not L.has_cross_block_edges and (sizes.numel() == 0 or int(sizes.max()) <= MAX_BLOCK_NODES)


def chebyshev_filter_choice(x: torch.Tensor, L: GraphLaplacian, order: int, *,
                            algorithm: str | None = None) -> Choice:
    """The registry's answer for the forward of ``chebyshev_filter(x, L, ...)`` of this order: the backend, the
    algorithm (by its cost model, or ``algorithm`` forced: BackendUnavailable when it cannot run here) and why not
    the other backends."""
    backend = chebyshev_filter_backend(dtype=x.dtype, device=x.device).backend
    block_n = _padded_block_size(L) if backend == "triton" and block_layout_fits(L) else 0
    return chebyshev_filter_backend(order=order, block_n=block_n, algorithm=algorithm, dtype=x.dtype,
                                    device=x.device, shape=tuple(x.shape), nnz=L.matrix.values().numel(),
                                    groups=_dense_layout(L, _acc_dtype(x.dtype)))


def chebyshev_filter_path(x: torch.Tensor, L: GraphLaplacian, order: int) -> str:
    """Which implementation ``chebyshev_filter(x, L, ...)`` of this order runs: "torch-recursion",
    "torch-materialized" (p(Ã_b) per block, then one product), "triton-csr" (kernel 2), "triton-block" (kernel 1,
    recursion per tile) or "triton-block-materialized" (kernel 1 builds p(Ã_b), then applies it); "torch" for
    order 0 (c_0·x). For benchmark labels and logs."""
    if order == 0:
        return "torch"
    choice = chebyshev_filter_choice(x, L, order)
    return f"{choice.backend}-{choice.algorithm}"


def _dense_layout(L: GraphLaplacian, acc: torch.dtype) -> tuple[tuple[int, int], ...] | None:
    """The materialised form's groups ((G, n), ...) for L (cached on L), or None when L has cross-block edges or
    its dense blocks would exceed ``_chebyshev_dense.DENSE_MAX_BYTES``."""
    if L.has_cross_block_edges:
        return None
    if _GROUPS_ATTR not in L.__dict__:
        L.__dict__[_GROUPS_ATTR] = _chebyshev_dense.group_shapes((L.block_ptr[1:] - L.block_ptr[:-1]).tolist())
    shapes = L.__dict__[_GROUPS_ATTR]
    return shapes if _chebyshev_dense.fits(shapes, torch.empty(0, dtype=acc).element_size()) else None


def _padded_block_size(L: GraphLaplacian) -> int:
    """n_pad: the largest block rounded up to a power of two, at least 16 (tl.dot's smallest tile)."""
    sizes = L.block_ptr[1:] - L.block_ptr[:-1]
    n_max = int(sizes.max()) if sizes.numel() else 0
    return max(16, 1 << max(n_max - 1, 0).bit_length())


def _packed_blocks(L: GraphLaplacian, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Ã = L̂ − I per block in the packed layout (N, n_pad); n_pad = max(16, next power of two ≥ n_max)."""
    n = L.num_nodes
    n_pad = _padded_block_size(L)
    device = val.device
    nodes = torch.arange(n, device=device)
    node_block = torch.searchsorted(L.block_ptr.to(device), nodes, right=True) - 1
    local = nodes - L.block_ptr.to(device)[node_block]
    row = torch.repeat_interleave(nodes, crow[1:] - crow[:-1])
    blocks = torch.zeros(n, n_pad, dtype=val.dtype, device=device)
    blocks[row, local[col]] = val
    blocks[nodes, local] -= 1.0
    return blocks


def _prepared(L: GraphLaplacian, lambda_max: float, acc: torch.dtype,
              with_blocks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, val = 2/λ_max · L values, block_ptr on L's device, packed Ã or an empty tensor), cached on L."""
    cache = L.__dict__.setdefault(_PREPARED_ATTR, {})
    key = (lambda_max, acc, with_blocks)
    if key not in cache:
        matrix = L.matrix
        crow, col = matrix.crow_indices().contiguous(), matrix.col_indices().contiguous()
        val = (matrix.values().to(acc) * (2.0 / lambda_max)).contiguous()
        blocks = _packed_blocks(L, crow, col, val) if with_blocks else val.new_empty(0)
        if len(cache) >= _PREPARED_KEEP:
            cache.pop(next(iter(cache)))
        cache[key] = (crow, col, val, L.block_ptr.to(L.device), blocks)
    return cache[key]


def _prepared_dense(L: GraphLaplacian, lambda_max: float,
                    acc: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The materialised form's (dense Ã per group, rows per group) of ``_chebyshev_dense.dense_groups``, cached on
    L (built only when that form is chosen)."""
    cache = L.__dict__.setdefault(_PREPARED_ATTR, {})
    key = (lambda_max, acc, "dense")
    if key not in cache:
        crow, col, val, _, _ = _prepared(L, lambda_max, acc, with_blocks=False)
        groups = _chebyshev_dense.dense_groups(L.block_ptr, crow, col, val)
        if len(cache) >= _PREPARED_KEEP:
            cache.pop(next(iter(cache)))
        cache[key] = groups
    return cache[key]


# ------------------------------------------------------------------------------------------ public API
def _check_order(order: object) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"order must be an int, got {type(order).__name__}")
    if order < 0:
        raise ValueError(f"order must be non-negative, got {order}")
    return order


def _graph_plan(L: GraphLaplacian, x_shape: tuple[int, ...], x_device: torch.device, x_dtype: torch.dtype,
                lambda_max: float | None, gain: Callable[[torch.Tensor], torch.Tensor] | None,
                order: int, algorithm: str | None) -> tuple[object, ...]:
    """Checks x against L, settles λ_max, asks the registry (raising when a forced ``algorithm`` cannot run), and
    returns the op's graph tensors (cached on L; the dense block groups only when the materialised form runs) plus
    the gain's coefficients (or an empty tensor). Runs eagerly even under torch.compile — the CSR matrix and the
    caches are not traceable — and the compiled graph holds its results as constants."""
    if not isinstance(L, GraphLaplacian):
        raise TypeError(f"L must be a GraphLaplacian (from ParameterGraph.laplacian()), got {type(L).__name__}")
    if x_shape[0] != L.num_nodes:
        raise ValueError(f"x must have {L.num_nodes} rows (the Laplacian has {L.num_nodes} nodes), "
                         f"got shape {x_shape}")
    if x_device != L.device:
        raise ValueError(f"x is on {x_device} but L is on {L.device}; move L with L.to(x.device)")
    lam = estimate_lambda_max(L) if lambda_max is None else check_lambda_max(L, lambda_max)
    acc = _acc_dtype(x_dtype)
    with_blocks = (chebyshev_filter_backend(dtype=x_dtype, device=x_device).backend == "triton"
                   and block_layout_fits(L))
    tensors = _prepared(L, lam, acc, with_blocks)
    choice = chebyshev_filter_backend(order=order, block_n=tensors[4].shape[1] if with_blocks else 0,
                                      algorithm=algorithm, dtype=x_dtype, device=x_device, shape=x_shape,
                                      nnz=tensors[2].numel(), groups=_dense_layout(L, acc))
    materialized = order > 0 and (choice.backend, choice.algorithm) == ("torch", "materialized")
    dense = _prepared_dense(L, lam, acc) if materialized else ([], [])
    coeffs = (chebyshev_coefficients(gain, order, lam).to(device=x_device, dtype=acc) if gain is not None
              else torch.empty(0, dtype=acc, device=x_device))
    return (*tensors, *dense, coeffs)


# What torch.compiler.assume_constant_result(_graph_plan) does, minus its import of torch._dynamo at import time.
_graph_plan._dynamo_marked_constant = True


def chebyshev_filter(x: torch.Tensor, L: GraphLaplacian, coeffs: torch.Tensor | Sequence[float] | None = None, *,
                     gain: Callable[[torch.Tensor], torch.Tensor] | None = None, order: int | None = None,
                     lambda_max: float | None = None, algorithm: str | None = None) -> torch.Tensor:
    """Filter x along its node dimension by a polynomial of the graph Laplacian, without eigenvectors.

        y = Σ_{m=0..K} c_m T_m(L̃) x,    L̃ = 2L/λ_max − I,    T_0 = 1, T_1 = t, T_{m+1} = 2t T_m − T_{m−1}

    Give either ``coeffs`` (a learnable polynomial filter) or ``gain`` and ``order`` (coefficients of the
    Chebyshev interpolant of g on [0, λ_max], ``filters.chebyshev_coefficients``; K = order).

    Args:
        x: (N, d) or (N,), float16/bfloat16/float32/float64, any strides; N = L.num_nodes; same device as L.
        L: the GraphLaplacian (normalized or combinatorial; block-diagonal or with cross-block edges).
        coeffs: (K+1,) float tensor on x's device (differentiable), or a sequence of numbers.
        gain: a callable g(λ) on float64 tensors, e.g. ``spectralkern.heat(1.0)``; needs ``order``. Its
            coefficients are computed on the CPU and copied to x's device in every call; in a training loop,
            compute them once with ``filters.chebyshev_coefficients`` and pass ``coeffs``.
        order: K ≥ 0; with ``coeffs`` optional, and then it must equal len(coeffs) − 1.
        lambda_max: the end of the interval; None: ``estimate_lambda_max(L)`` (a few Lanczos steps, cached on
            L). A value below L's spectrum raises ValueError (the polynomials blow up outside [−1, 1]).
        algorithm: None lets the registry choose by its cost model (``spectralkern info`` lists them); one of
            the backend's algorithms forces it — torch: "recursion" or "materialized" (block-diagonal L only),
            triton: "block", "block-materialized" or "csr". One that cannot run raises BackendUnavailable with
            the reason. A backward pass that needs the coefficients' gradient runs the recursion.
    Returns:
        y with x's shape and dtype (contiguous). Differentiable w.r.t. x and ``coeffs``; fp32 accumulation
        (fp64 for fp64 inputs).
    """
    check_tensor("x", x, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be None or one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if (coeffs is None) == (gain is None):
        raise ValueError("give exactly one of coeffs (explicit Chebyshev coefficients) and gain (a function g(λ) "
                         f"plus an order); got {'both' if gain is not None else 'neither'}")
    if order is not None:
        _check_order(order)
    if gain is not None and order is None:
        raise ValueError("order is required with gain: the polynomial degree K of the approximation")
    if coeffs is not None:
        if not isinstance(coeffs, torch.Tensor):
            try:
                coeffs = torch.tensor([float(c) for c in coeffs], dtype=_acc_dtype(x.dtype), device=x.device)
            except (TypeError, ValueError):
                raise TypeError(f"coeffs must be a 1-D float tensor or a sequence of numbers, got {coeffs!r}") from None
        check_tensor("coeffs", coeffs, ndim=1, dtypes=FLOAT_DTYPES)
        if coeffs.numel() == 0:
            raise ValueError("coeffs must hold at least one coefficient (c_0), got shape (0,)")
        if order is not None and coeffs.numel() != order + 1:
            raise ValueError(f"coeffs must have order + 1 = {order + 1} entries, got shape {tuple(coeffs.shape)}")
        check_same_device("coeffs", coeffs, "x", x)
    degree = order if gain is not None else coeffs.numel() - 1
    crow, col, val, block_ptr, blocks, dense_blocks, dense_rows, gain_coeffs = _graph_plan(
        L, tuple(x.shape), x.device, x.dtype, lambda_max, gain, degree, algorithm)
    vector = x.dim() == 1
    x2 = x.unsqueeze(1) if vector else x
    op = torch.ops.spectralkern.chebyshev_filter if torch.compiler.is_compiling() else _eager_chebyshev_filter
    y = op(x2, coeffs if gain is None else gain_coeffs, crow, col, val, block_ptr, blocks, dense_blocks, dense_rows,
           algorithm or "")
    return y.squeeze(1) if vector else y

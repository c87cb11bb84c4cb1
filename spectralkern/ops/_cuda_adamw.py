"""Launchers of the compiled AdamW kernels (csrc/adamw_kernel.cuh): the ``cuda`` backend of ``adamw_update_``.

Same contract as the Triton launchers in ``adamw_update.py``: one AdamW step in place on param, exp_avg and
exp_avg_sq, on the spectrally filtered gradient when a basis is given (one launch over all blocks: Uᵀg stays on
chip; g, p, m, v read once, m, v, p written once), else the plain elementwise update; grad is only read; fp32
arithmetic, each operation rounded once in torch's order.

Compiled for (the registry's ``adamw_update`` entry, ``_backend.OPS``): float32 / float16 / bfloat16 parameters with
float32 moments, bfloat16 parameters with bfloat16 moments, a basis of k ≤ ``CUDA_MAX_K``. float16 parameters with
bfloat16 moments (``state_dtype=torch.bfloat16`` on a float16 model) and wider bases stay on Triton / torch: one
more dtype pair would add 8 kernel variants to every build for a combination the optimizer only makes on request.
"""
from __future__ import annotations

import torch

from .. import _extensions
from ..basis import SpectralBasis
from ._cuda_args import tensor_desc


def _extension():
    ext = _extensions.module("cuda")
    if not hasattr(ext, "spectral_adamw"):  # a build from before the AdamW kernels, left in place
        raise RuntimeError(f"the CUDA extension at {getattr(ext, '__file__', '?')} was built without the AdamW "
                           f"kernels; rebuild it ({_extensions.BUILD_HINT})")
    return ext


def adamw_update_cuda_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       scalars: tuple[float, ...], basis: SpectralBasis | None = None,
                       gains: torch.Tensor | None = None, passthrough: float = 0.0) -> None:
    """One AdamW step in place on the compiled kernels, on torch's current stream of param's device.

    Shapes: with a basis, param / grad / exp_avg / exp_avg_sq (N, d), any strides, gains (B, k); without one, any
    shape, param / exp_avg / exp_avg_sq contiguous (grad is made contiguous here). ``scalars``: ``_scalars(hyper)``
    of adamw_update.py, (1 − β1, β2, 1 − β2, ε, 1 − lr·wd, lr / (1 − β1^t), √(1 − β2^t)). U and gains are read as
    float32 (converted here when they are not), grad in param's dtype.
    """
    ext = _extension()
    codes = ext.DTYPES
    dtype, state_dtype = (codes[str(t).removeprefix("torch.")] for t in (param.dtype, exp_avg.dtype))
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    device = param.device
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        if basis is None:
            flat = grad.contiguous()
            ext.adamw(grad=(flat.data_ptr(), flat.numel()), param=(param.data_ptr(), param.numel()),
                      exp_avg=(exp_avg.data_ptr(), exp_avg.numel()),
                      exp_avg_sq=(exp_avg_sq.data_ptr(), exp_avg_sq.numel()), dtype=dtype,
                      state_dtype=state_dtype, hyper=tuple(scalars), device=device.index, stream=stream)
            return
        U32 = basis.U.to(device=device, dtype=torch.float32)
        gains32 = gains.to(device=device, dtype=torch.float32)
        offsets = basis.block_ptr_on(device).to(torch.int64).contiguous()  # the kernel indexes it densely
        ext.spectral_adamw(grad=tensor_desc(grad), param=tensor_desc(param), exp_avg=tensor_desc(exp_avg),
                           exp_avg_sq=tensor_desc(exp_avg_sq), U=tensor_desc(U32), gains=tensor_desc(gains32),
                           block_ptr=(offsets.data_ptr(), offsets.numel()), dtype=dtype, state_dtype=state_dtype,
                           passthrough=float(passthrough), hyper=tuple(scalars), device=device.index,
                           stream=stream)

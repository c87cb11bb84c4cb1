"""Benchmark of the spectral filter y = h·x + U diag(g − h) Uᵀ x, block by block.

Providers:
    spectralkern    ``spectralkern.spectral_filter`` (label: the backend that ran, from the registry — cuda, triton, or
                    torch with its algorithm: torch-batched, torch-padded, torch-loop)
    spectralkern_triton  the Triton kernel launched directly, timed beside the compiled one when ``spectralkern``
                    ran on the CUDA extension (csrc/)
    torch_loop      eager torch, a Python loop over blocks: two GEMMs per block, h·x fused into the second
                    (``addmm`` with beta = h) and written straight into one preallocated output
    torch_bmm       eager torch for uniform blocks only: bmm → scale → baddbmm over (B, n, ·) views, no copies
    torch_compile   ``torch.compile(fullgraph=True)`` of torch_bmm (uniform) or of the loop (ragged; the loop is
                    written functionally, one addmm per block then one cat, because ``out=`` into slices of a
                    preallocated tensor breaks the graph). Skipped in ``--quick`` on the CPU, where inductor's
                    C++ warm-up alone takes tens of seconds per case.

Traffic counted (``bytes``): read x, write y, read U once; the gains (B·k floats) are left out. Flops: the two
products, 4·d·Σ_b n_b·k_b with k_b = min(k, n_b).
Compute ceiling (``compute_kind``): the Triton kernel does fp32-accumulated ``tl.dot`` in tf32x3 for fp32 inputs
and in tf32 for fp16/bf16 inputs (converted to fp32 on load), so those are the rates its TFLOP/s is judged
against, for every provider of the case.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..._backend import BackendUnavailable, forced
from ...basis import SpectralBasis
from ...ops.spectral_filter import spectral_filter, spectral_filter_backend
from ..case import Case, Prepared, Provider, interpreter_skip
from ..inputs import ragged_block_ptr, random_basis, uniform_block_ptr

OP = "spectral_filter"
#: every provider name a case of this op can time or skip (``--providers`` is checked against it up front)
PROVIDERS = ("spectralkern", "spectralkern_triton", "torch_loop", "torch_bmm", "torch_compile")

# ‖out − ref‖ / ‖ref‖ allowed against the float64 answer on the same rounded inputs. fp32 sits far under 1e-4
# (tf32x3 too); plain tf32 (~3e-4) would fail it on purpose. bf16/fp16 round the output and, in torch eager,
# the (k, d) coefficients.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
_COMPUTE_KIND = {torch.float32: "tf32x3", torch.bfloat16: "tf32", torch.float16: "tf32"}
_SEED = 0  # layouts and data are the same in every run, so runs on different machines compare


@dataclass(frozen=True)
class _Config:
    layout: str             # "uniform" or "ragged"
    num_nodes: int
    dim: int
    block_ptr: torch.Tensor  # (B+1,) int64, CPU
    block_label: str        # "128" or "1..512"
    k: int
    passthrough: float

    @property
    def name(self) -> str:
        h = f"-h{self.passthrough:g}" if self.passthrough else ""
        return f"{self.layout}-N{self.num_nodes}-d{self.dim}-b{self.block_label}-k{self.k}{h}"

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        """(start, stop, k_b) of every non-empty block."""
        ptr = self.block_ptr.tolist()
        return [(a, b, min(self.k, b - a)) for a, b in zip(ptr[:-1], ptr[1:]) if b > a]


def _configs(quick: bool) -> list[_Config]:
    gen = torch.Generator().manual_seed(_SEED)
    if quick:
        small = uniform_block_ptr(512, 64)
        return [_Config("uniform", 512, 256, small, "64", 8, 0.0),
                _Config("uniform", 512, 256, small, "64", 32, 0.5),
                _Config("ragged", 512, 256, ragged_block_ptr(512, 64, gen), "1..64", 8, 0.0)]
    # Llama-7B shapes: q/k/v/o (4096 × 4096) with 128-row tiles (one head); MLP (11008 × 4096) with 256-row tiles.
    attn, mlp = uniform_block_ptr(4096, 128), uniform_block_ptr(11008, 256)
    ragged = ragged_block_ptr(11008, 512, gen)
    out = [_Config("uniform", 4096, 4096, attn, "128", k, 0.0) for k in (8, 32, 64)]
    out.append(_Config("uniform", 4096, 4096, attn, "128", 32, 0.5))  # residual form: x is read twice
    out += [_Config("uniform", 11008, 4096, mlp, "256", k, 0.0) for k in (8, 32, 64)]
    out += [_Config("ragged", 11008, 4096, ragged, "1..512", k, 0.0) for k in (8, 32, 64)]
    return out


def cases(device: torch.device, quick: bool) -> list[Case]:
    """fp32 only in --quick on the CPU; fp32 and bf16 otherwise."""
    dtypes = [torch.float32] if quick and device.type != "cuda" else [torch.float32, torch.bfloat16]
    out = []
    for dtype in dtypes:
        for cfg in _configs(quick):
            es = torch.empty(0, dtype=dtype).element_size()
            flops = 4 * cfg.dim * sum((b - a) * kb for a, b, kb in cfg.spans)
            shape = {"N": cfg.num_nodes, "d": cfg.dim, "k": cfg.k, "blocks": cfg.block_ptr.numel() - 1,
                     "block_size": cfg.block_label, "passthrough": cfg.passthrough}
            out.append(Case(op=OP, name=cfg.name, layout=cfg.layout, dtype=dtype, shape=shape,
                            bytes=(2 * cfg.num_nodes * cfg.dim + cfg.num_nodes * cfg.k) * es, flops=flops,
                            compute_kind=_COMPUTE_KIND[dtype],
                            prepare=functools.partial(_prepare, cfg, dtype, quick)))
    return out


# ------------------------------------------------------------------------------------------ torch peers
def _loop_eager(x: torch.Tensor, U: torch.Tensor, gains: torch.Tensor, spans: list[tuple[int, int, int]],
                h: float) -> torch.Tensor:
    """x (N, d), U (N, k), gains (B', k) for the B' non-empty blocks in ``spans`` -> y (N, d)."""
    coef = (gains - h).to(x.dtype)
    y = torch.empty_like(x)
    for b, (start, stop, kb) in enumerate(spans):
        U_b, x_b = U[start:stop, :kb], x[start:stop]
        torch.addmm(x_b, U_b, (U_b.T @ x_b) * coef[b, :kb, None], beta=h, out=y[start:stop])
    return y


def _loop_functional(x: torch.Tensor, U: torch.Tensor, gains: torch.Tensor, spans: list[tuple[int, int, int]],
                     h: float) -> torch.Tensor:
    """The same loop without ``out=`` (what torch.compile can trace as one graph)."""
    coef = (gains - h).to(x.dtype)
    parts = []
    for b, (start, stop, kb) in enumerate(spans):
        U_b, x_b = U[start:stop, :kb], x[start:stop]
        parts.append(torch.addmm(x_b, U_b, (U_b.T @ x_b) * coef[b, :kb, None], beta=h))
    return torch.cat(parts)


def _bmm(x: torch.Tensor, U3: torch.Tensor, gains: torch.Tensor, h: float) -> torch.Tensor:
    """Uniform blocks: x (B·n, d), U3 (B, n, k), gains (B, k) -> y (B·n, d)."""
    num_blocks, n, _ = U3.shape
    x3 = x.view(num_blocks, n, -1)
    coef = (gains - h).to(x.dtype)
    c = torch.bmm(U3.transpose(1, 2), x3) * coef[:, :, None]
    return torch.baddbmm(x3, U3, c, beta=h).view_as(x)


def _forced_filter(backend: str, x: torch.Tensor, basis: SpectralBasis, gains: torch.Tensor,
                   passthrough: float) -> torch.Tensor:
    """The filter op with its backend forced (a kernel timed beside the one the registry picks)."""
    with forced(backend):
        return spectral_filter(x, basis, gains, passthrough=passthrough)


# ------------------------------------------------------------------------------------------ setup
def _prepare(cfg: _Config, dtype: torch.dtype, quick: bool, device: torch.device) -> Prepared:
    gen = torch.Generator().manual_seed(_SEED)
    basis = random_basis(cfg.block_ptr, cfg.k, dtype=dtype, device=device, generator=gen)
    gains = torch.exp(-basis.eigenvalues).contiguous()  # heat filter, t = 1; (B, k) fp32
    dev_gen = torch.Generator(device=device).manual_seed(_SEED)
    x = torch.randn(cfg.num_nodes, cfg.dim, device=device, generator=dev_gen).to(dtype)
    U, h, spans = basis.U, cfg.passthrough, cfg.spans
    nonempty = torch.nonzero(cfg.block_ptr.diff() > 0).flatten().to(device)
    block_gains = gains.index_select(0, nonempty)  # (B', k): the loops skip empty blocks

    reference = _loop_eager(x.double(), U.double(), block_gains.double(), spans, h)
    providers, skipped = [], {}

    choice = spectral_filter_backend(x, cfg.k, basis.block_ptr)
    backend = choice.backend + (f"-{choice.algorithm}" if choice.algorithm else "")
    if interpreter_skip(choice.backend, dtype):
        skipped["spectralkern"] = interpreter_skip(choice.backend, dtype)
    else:
        providers.append(Provider("spectralkern", backend,
                                  lambda: spectral_filter(x, basis, gains, passthrough=h)))
    if choice.backend == "cuda":  # the Triton kernel timed beside the compiled one, through the op
        try:
            spectral_filter_backend(x, cfg.k, basis.block_ptr, backend="triton")
        except BackendUnavailable as exc:
            skipped["spectralkern_triton"] = str(exc)
        else:
            providers.append(Provider("spectralkern_triton", "triton", functools.partial(
                _forced_filter, "triton", x, basis, gains, h)))

    providers.append(Provider("torch_loop", "torch", lambda: _loop_eager(x, U, block_gains, spans, h)))
    uniform = len({hi - lo for lo, hi, _ in spans}) == 1 and len(spans) == cfg.block_ptr.numel() - 1
    if uniform:
        U3 = U.view(len(spans), spans[0][1] - spans[0][0], cfg.k)
        providers.append(Provider("torch_bmm", "torch", lambda: _bmm(x, U3, gains, h)))
    else:
        skipped["torch_bmm"] = "needs uniform blocks"

    if quick and device.type == "cpu":
        skipped["torch_compile"] = "inductor's CPU warm-up takes tens of seconds per case; left out of --quick on CPU"
    else:
        torch._dynamo.reset()  # one compile per case: earlier cases' guards would count toward the recompile limit
        if uniform:
            compiled_bmm = torch.compile(_bmm, fullgraph=True, dynamic=False)
            providers.append(Provider("torch_compile", "inductor", lambda: compiled_bmm(x, U3, gains, h)))
        else:
            compiled_loop = torch.compile(_loop_functional, fullgraph=True, dynamic=False)
            providers.append(Provider("torch_compile", "inductor",
                                      lambda: compiled_loop(x, U, block_gains, spans, h)))
    return Prepared(providers=providers, reference=reference, tolerance=_TOLERANCE[dtype], skipped=skipped)

"""The registry: the one place that decides which implementation (backend) and which algorithm runs an op.

The table ``OPS`` lists, per op, its backends in the order ``auto`` prefers them — each with the dtypes it takes,
its size limits (``k ≤ 256``, ...) and the layout facts it needs — and, for ops with several, its algorithms. A
backend also needs its runtime and a device it runs on (``runtime_status``):

    cuda    the compiled CUDA extension spectralkern._C, built and usable here; tensors on a CUDA device
    triton  triton importable; tensors on a CUDA device, or on the CPU with TRITON_INTERPRET=1 (how CI runs them)
    native  the compiled CPU module spectralkern._native; tensors on the CPU
    torch   plain torch, any device (every op has it: the reference)

``backend_of(op, *tensors, backend=None, **facts)`` answers for one call: the backend that runs (the first
that can, or the one forced by ``backend=`` / ``SPECTRALKERN_BACKEND``), the algorithm, and for every other backend
why not. A forced backend that cannot run raises ``BackendUnavailable`` with the reason; nothing falls back
silently. Every op, the CLI, the examples and the benchmarks ask this function; none re-derives the rule.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from . import _extensions  # importing it loads neither module: the first dispatch (or `info`) probes them
from ._checks import FLOAT_DTYPES

BACKENDS = ("cuda", "triton", "native", "torch")  # the order ``auto`` tries them in, for every op
ENV_VAR = "SPECTRALKERN_BACKEND"

# ------------------------------------------------------------------------------------------ kernel limits
# Each is a property of one kernel family, written here once; the ops read them from the table.
TRITON_MAX_K = 256          # filter / spectral AdamW kernels keep (K_PAD × BLOCK_D) coefficients in registers
CUDA_MAX_K = 128            # the widest basis csrc/ instantiates (csrc/spectral_filter.h, kMaxK)
TRITON_MAX_RANK = 64        # smoa: the kernels keep (R_PAD × BLOCK) factor tiles in registers
TRITON_MAX_HEAD_DIM = 256   # coeff_attention: one head's (BLOCK × D_PAD) tiles in registers
TRITON_MAX_DIM = 46000      # fourier: the phase index·frequency mod dim is int32, (dim + 64)·dim < 2^31
NATIVE_LANCZOS_MAX_NODES = 16384  # eigensolver: the unrestarted Krylov basis of one component (eigen/_tuning.py)

TRITON_DTYPES = FLOAT_DTYPES
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NATIVE_DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------ the table's types
def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    dtypes: input dtypes it takes (the op's main tensor: x, the parameter, the query).
    limits: size fact -> the largest value it handles, e.g. {"k": 256}; a fact the caller does not give is not
        checked (a plain AdamW update has no k).
    requires: boolean fact -> what it means, e.g. {"dense_state": "p, m and v share strides"}: when the caller
        gives the fact it must be true (the ops always give theirs; ``spectralkern info`` asks without).
    state_dtypes: for optimizers, input dtype -> the moment dtypes it takes with it (None: any).
    """

    name: str
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    limits: Mapping[str, int] = field(default_factory=dict)
    requires: Mapping[str, str] = field(default_factory=dict)
    state_dtypes: Mapping[torch.dtype, tuple[torch.dtype, ...]] | None = None

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend name must be one of {', '.join(BACKENDS)}, got {self.name!r}")
        object.__setattr__(self, "limits", _frozen(self.limits))
        object.__setattr__(self, "requires", _frozen(self.requires))
        if self.state_dtypes is not None:
            object.__setattr__(self, "state_dtypes", _frozen(self.state_dtypes))


@dataclass(frozen=True)
class Algorithm:
    """One way of computing an op on some of its backends.

    requires: boolean fact -> meaning, as for Backend. cost: facts -> a comparable cost (lower wins), or None for
    "prefer in table order"; among the algorithms that can run, the lowest cost wins, ties to the earlier one.
    """

    name: str
    backends: tuple[str, ...]
    requires: Mapping[str, str] = field(default_factory=dict)
    cost: Callable[[Mapping[str, object]], float] | None = None
    doc: str = ""
    needs: tuple[str, ...] = ()  # the facts ``cost`` reads; a call without them gets no algorithm (Choice.algorithm None)

    def __post_init__(self):
        object.__setattr__(self, "requires", _frozen(self.requires))


@dataclass(frozen=True)
class OpSpec:
    """An op's entry: its backends (auto's order) and algorithms. ``follows_env``: SPECTRALKERN_BACKEND forces this
    op's backend (False: only the op's own ``backend=`` argument does — the eigensolver, which has its own)."""

    name: str
    backends: tuple[Backend, ...]
    algorithms: tuple[Algorithm, ...] = ()
    doc: str = ""
    follows_env: bool = True

    def __post_init__(self):
        names = [b.name for b in self.backends]
        if "torch" not in names:
            raise ValueError(f"op {self.name!r} must list the torch backend (every op has its reference)")
        if names != sorted(names, key=BACKENDS.index):
            raise ValueError(f"op {self.name!r} lists its backends as {names}; list them in auto's order {BACKENDS}")
        for algorithm in self.algorithms:
            unknown = set(algorithm.backends) - set(names)
            if unknown:
                raise ValueError(f"algorithm {algorithm.name!r} of op {self.name!r} names backends the op lacks: "
                                 f"{sorted(unknown)}")

    def backend(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)


@dataclass(frozen=True, eq=False)
class Choice:
    """The registry's answer for one call: ``backend`` runs it with ``algorithm`` (None when the op has only one
    way on that backend, or the call gave no facts to choose by); ``rejected`` says, for each of the op's other
    backends, why it does not run. Compares equal to its backend's name (``choice == "torch"``)."""

    op: str
    backend: str
    algorithm: str | None
    rejected: Mapping[str, str]
    forced: bool = False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.backend == other
        if isinstance(other, Choice):
            return (self.op, self.backend, self.algorithm) == (other.op, other.backend, other.algorithm)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.backend)

    def __str__(self) -> str:
        return self.backend

    def describe(self) -> str:
        how = f"{self.backend}" + (f" ({self.algorithm})" if self.algorithm else "")
        how += " [forced]" if self.forced else ""
        others = "; ".join(f"{name}: {why}" for name, why in self.rejected.items())
        return f"{self.op} on {how}" + (f" — not {others}" if others else "")


class BackendUnavailable(RuntimeError):
    """A forced backend (``backend=`` or SPECTRALKERN_BACKEND) cannot run this call; the message says why."""


# ------------------------------------------------------------------------------------------ algorithm costs
# The torch filter's cost model, in rows of batched GEMM work (one row: 4·d·k FLOPs). Fitted to callgrind
# instruction counts on this repo's CPU machine at d = 256, k = 8 (benchmarks/NOTES.md, "CPU backend"):
# a block of the Python loop costs its rows plus a fixed overhead of two small GEMM calls (~52 rows' work there,
# so 52·2048/(d·k) in general); the padded form multiplies every block at the largest block's size (~0.87 of a
# batched row: one pass over bigger batches) and copies each real row in and out (~2 rows' work at k = 8: 16/k).
LOOP_BLOCK_OVERHEAD = 52.0 * 256 * 8
PADDED_ROW = 0.87
PADDED_COPY = 16.0


def _batched_cost(facts: Mapping[str, object]) -> float:
    return float(facts["rows"])


def _padded_cost(facts: Mapping[str, object]) -> float:
    return (PADDED_ROW * float(facts["blocks"]) * float(facts["max_block"])
            + PADDED_COPY / max(1, int(facts["k"])) * float(facts["rows"]))


def _loop_cost(facts: Mapping[str, object]) -> float:
    per_block = LOOP_BLOCK_OVERHEAD / max(1, int(facts["d"]) * int(facts["k"]))
    return float(facts["rows"]) + per_block * float(facts["blocks"])


def _materialized_cost(facts: Mapping[str, object]) -> float:
    """FLOPs per row of building P_b = p(Ã_b) (K·n) and applying it (d) — fewer than the recursion's K·d when the
    order is high and the blocks small next to d."""
    return float(facts["order"]) * float(facts["block_n"]) + float(facts["d"])


def _recursion_cost(facts: Mapping[str, object]) -> float:
    return float(facts["order"]) * float(facts["d"])


def _chebyshev_torch_cost(algorithm: str) -> Callable[[Mapping[str, object]], float]:
    """The torch Chebyshev forms' measured cost model (``ops/_chebyshev_cost.py``: predicted seconds of one pass)."""
    def cost(facts: Mapping[str, object]) -> float:
        from .ops._chebyshev_cost import seconds  # imported on use: ops/ imports this module

        return seconds(algorithm, facts)
    return cost


def _fourier_cost(form: str) -> Callable[[Mapping[str, object]], float]:
    """The Fourier adapter's measured cost model (``ops/_fourier_cost.py``: predicted seconds of one call)."""
    def cost(facts: Mapping[str, object]) -> float:
        from .ops._fourier_cost import form_seconds  # imported on use: ops/ imports this module

        return form_seconds(form, facts)
    return cost


def _eigen_cost(solver: str, backend: str) -> Callable[[Mapping[str, object]], float]:
    """The eigensolver's cost model (``eigen/_tuning.py``: a ranking of the solvers for one item, from its tables)."""
    def cost(facts: Mapping[str, object]) -> float:
        from .eigen._tuning import solver_cost  # imported on use: eigen/ imports this module

        return solver_cost(solver, backend, facts)
    return cost


def _products_cost(storage: str) -> Callable[[Mapping[str, object]], float]:
    """The batched Lanczos's product storage by ``eigen/_tuning.py``'s threshold."""
    def cost(facts: Mapping[str, object]) -> float:
        from .eigen._tuning import products_cost  # imported on use: eigen/ imports this module

        return products_cost(storage, facts)
    return cost


# ------------------------------------------------------------------------------------------ the table
_FOURIER = ("tokens", "in_features", "out_features", "n", "slots", "gated", "backward", "need_x", "need_params",
            "device_type", "acc")
_LAYOUT = ("uniform", "rows", "blocks", "max_block", "d", "k")
_CHEBYSHEV = ("order", "block_n", "d")
_CHEBYSHEV_TORCH = ("order", "d", "nodes", "nnz", "groups", "device_type", "acc")
_SPECTRAL_ADAMW_STATES = {torch.float32: (torch.float32,), torch.float16: (torch.float32,),
                          torch.bfloat16: (torch.float32, torch.bfloat16)}
_GROUPED = {"grouped": "a whole param group in one call (adamw_update_group_)"}
_SAME_DTYPE = {"same_dtype": "param, grad and moments share one dtype, float32 or float64"}
_DENSE_STATE = {"dense_state": "exp_avg and exp_avg_sq share one dtype and param's strides; param is contiguous"}
_EIGEN = ("nodes", "k", "device_type")  # per item: a block, a connected component or a group of components
_KRYLOV_FITS = {"krylov_fits": "the item has more nodes than the Krylov basis (ncv + block size)"}
_DENSE_EIGH = "batched torch.linalg.eigh of the padded items (exact, multiplicities included)"

OPS: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("spectral_filter", (
        Backend("cuda", CUDA_DTYPES, {"k": CUDA_MAX_K}),
        Backend("triton", TRITON_DTYPES, {"k": TRITON_MAX_K}),
        Backend("native", NATIVE_DTYPES, requires={"ragged": "blocks of unequal sizes (uniform ones run faster "
                                                             "as two batched GEMMs on torch)"}),
        Backend("torch"),
    ), algorithms=(
        Algorithm("batched", ("torch",), {"uniform": "every block has the same number of rows"}, _batched_cost,
                  "blocks as (B, n, ·) views: two bmm", _LAYOUT),
        Algorithm("padded", ("torch",), {}, _padded_cost,
                  "ragged blocks zero-padded to the largest: one gather, two bmm, one scatter", _LAYOUT),
        Algorithm("loop", ("torch",), {}, _loop_cost, "two GEMMs per block (few, large blocks)",
                  _LAYOUT),
    ), doc="y = h·x + U diag(g − h) Uᵀ x per block"),
    OpSpec("adamw_update", (
        Backend("cuda", CUDA_DTYPES, {"k": CUDA_MAX_K}, _DENSE_STATE, _SPECTRAL_ADAMW_STATES),
        Backend("triton", CUDA_DTYPES, {"k": TRITON_MAX_K}, _DENSE_STATE),
        Backend("torch"),
    ), algorithms=(
        Algorithm("fused", ("torch",), {**_GROUPED, "filtered": "a basis is given", **_SAME_DTYPE}, None,
                  "the group's filtered gradients (the filter's own algorithm) into temporaries, then one "
                  "torch._fused_adamw_ over them: bit-identical to torch.optim.AdamW(fused=True)"),
        Algorithm("foreach", ("torch",), {**_GROUPED, "plain": "no basis", **_SAME_DTYPE}, None,
                  "torch._foreach_* ops over the group in torch.optim.AdamW's order: bit-identical to it"),
        Algorithm("reference", ("torch",), {}, None,
                  "per parameter: filter into a temporary, then torch's single-tensor AdamW ops (fp32 arithmetic "
                  "for half-precision parameters)"),
    ), doc="one AdamW step in place, on the spectrally filtered gradient when a basis is given"),
    OpSpec("chebyshev_filter", (
        Backend("triton", TRITON_DTYPES),
        Backend("torch"),
    ), algorithms=(
        Algorithm("block-materialized", ("triton",),
                  {"block_layout": "no cross-block edges, every block within the block kernel's size",
                   "forward": "a forward pass (the backward runs the recursion)"}, _materialized_cost,
                  "builds P_b = p(Ã_b) per block, then one product with x", _CHEBYSHEV),
        Algorithm("block", ("triton",), {"block_layout": "no cross-block edges, every block within the block "
                                                         "kernel's size"}, _recursion_cost,
                  "the recursion per (block, column tile) on chip", _CHEBYSHEV),
        Algorithm("csr", ("triton",), {}, lambda facts: float("inf"), "K launches over the CSR matrix",
                  _CHEBYSHEV),
        Algorithm("recursion", ("torch",), {}, _chebyshev_torch_cost("recursion"),
                  "K torch.sparse products over all of x", _CHEBYSHEV_TORCH),
        Algorithm("materialized", ("torch",),
                  {"dense_blocks": "no cross-block edges, and the dense blocks within _chebyshev_dense.DENSE_MAX_BYTES",
                   "forward": "no coefficients' gradient in this pass (it needs every T_m·grad_y: the recursion)"},
                  _chebyshev_torch_cost("materialized"),
                  "P_b = p(Ã_b) per block by Clenshaw (batched per padded size), then one bmm per group",
                  _CHEBYSHEV_TORCH),
    ), doc="y = Σ_m c_m T_m(2L/λ_max − I) x"),
    OpSpec("laplacian_quadratic", (
        Backend("triton", TRITON_DTYPES),
        Backend("torch"),
    ), doc="tr(Δᵀ L Δ) and L·x"),
    OpSpec("coeff_attention", (
        Backend("triton", TRITON_DTYPES, {"head_dim": TRITON_MAX_HEAD_DIM}),
        Backend("torch"),
    ), doc="attention with per-head spectral coefficients"),
    OpSpec("smoa_linear", (
        Backend("triton", TRITON_DTYPES, {"rank": TRITON_MAX_RANK}),
        Backend("torch"),
    ), doc="x Wᵀ + SMoA's modulated low-rank update"),
    OpSpec("fourier_adapter", (
        Backend("triton", TRITON_DTYPES, {"dim": TRITON_MAX_DIM}),
        Backend("torch"),
    ), algorithms=(
        Algorithm("fft", ("torch",), {}, _fourier_cost("fft"),
                  "rfft of x, gather at the n frequencies, scatter into out's bins, irfft", _FOURIER),
        Algorithm("dense", ("torch",), {"dense_fits": "the E dense ΔW fit the dense form's memory bound"},
                  _fourier_cost("dense"), "ΔW materialised once per call (one irfft2), then GEMMs", _FOURIER),
        Algorithm("per_frequency", ("triton", "torch"), {}, _fourier_cost("per_frequency"),
                  "the DFT at the n frequencies: twiddle GEMMs (torch) or on-chip twiddles (triton)", _FOURIER),
    ), doc="FourierFT / FourierMoE: the sparse-spectrum ΔW applied to x"),
    OpSpec("lowest_eigenpairs", (
        Backend("native", NATIVE_DTYPES, {"nodes": NATIVE_LANCZOS_MAX_NODES}),
        Backend("torch", NATIVE_DTYPES),
    ), algorithms=(
        Algorithm("dense", ("native",), {}, _eigen_cost("dense", "native"), _DENSE_EIGH, _EIGEN),
        Algorithm("dense", ("torch",), {}, _eigen_cost("dense", "torch"), _DENSE_EIGH, _EIGEN),
        Algorithm("native", ("native",), {}, _eigen_cost("native", "native"),
                  "compiled single-vector Lanczos, never restarted, items split across CPU threads", _EIGEN),
        Algorithm("lanczos", ("torch",), _KRYLOV_FITS, _eigen_cost("lanczos", "torch"),
                  "batched block Lanczos in torch, all items at once", _EIGEN),
        Algorithm("scipy", ("torch",), _KRYLOV_FITS, _eigen_cost("scipy", "torch"),
                  "ARPACK (scipy eigsh) per item on the host", _EIGEN),
        Algorithm("cupy", ("torch",), _KRYLOV_FITS, _eigen_cost("cupy", "torch"),
                  "cupyx eigsh per item on the GPU (only when asked for: untuned)", _EIGEN),
    ), doc="the k lowest eigenpairs of a Laplacian, per item (block or component); backend= of lowest_eigenpairs "
           "forces it, not SPECTRALKERN_BACKEND", follows_env=False),
    # The eigensolver's scans of L (no backend= of their own; SPECTRALKERN_BACKEND forces the kernels, not these):
    OpSpec("connected_components", (
        Backend("native", NATIVE_DTYPES),
        Backend("torch", NATIVE_DTYPES),
    ), doc="component labels of L's sparsity pattern: the compiled union-find, else scipy's csgraph on the host",
        follows_env=False),
    OpSpec("csr_summary", (
        Backend("native", NATIVE_DTYPES),
        Backend("torch", NATIVE_DTYPES),
    ), doc="lowest_eigenpairs' input checks of L (finite, symmetry probe, bounds) in one compiled pass, else torch "
           "ops", follows_env=False),
    OpSpec("lanczos_products", (
        Backend("torch", NATIVE_DTYPES),
    ), algorithms=(
        Algorithm("dense", ("torch",), {}, _products_cost("dense"), "padded dense blocks: one baddbmm", ("n_pad",)),
        Algorithm("csr", ("torch",), {}, _products_cost("csr"), "one padded CSR: one sparse matmul", ("n_pad",)),
    ), doc="the batched Lanczos's products with the flipped operator c·I − L", follows_env=False),
)}


# ------------------------------------------------------------------------------------------ runtimes
@dataclass(frozen=True, eq=False)  # identity: the registry keys its cached decisions on the status objects
class BackendStatus:
    name: str
    live: bool
    reason: str
    on_cpu: bool = False  # triton: the interpreter is on (TRITON_INTERPRET=1 must be set before triton's import)


def triton_interpreter_on() -> bool:
    """True when Triton kernels run through the CPU interpreter (must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "triton is not installed (it ships for Linux x86_64 only)")
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # a broken install must not break `import spectralkern`
        return BackendStatus("triton", False, f"import triton failed: {exc!r}")
    if triton_interpreter_on():
        return BackendStatus("triton", True, f"triton {triton.__version__} (interpreter, TRITON_INTERPRET=1)",
                             on_cpu=True)
    if not torch.cuda.is_available():
        return BackendStatus("triton", False,
                             f"triton {triton.__version__} installed, but no CUDA device "
                             "(set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")
    return BackendStatus("triton", True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")


def _extension_status(name: str) -> BackendStatus:
    status = _extensions.status(name)
    return BackendStatus(name, status.live, status.reason)


def runtime_status(name: str) -> BackendStatus:
    """Whether backend ``name``'s runtime is usable in this process at all (any device), and what it is."""
    if name == "torch":
        return BackendStatus("torch", True, f"torch {torch.__version__} (the reference, any device)")
    if name == "triton":
        return triton_status()
    if name in ("cuda", "native"):
        return _extension_status(name)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")


def all_status() -> list[BackendStatus]:
    return [runtime_status(name) for name in BACKENDS]


def _device_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device``, or None."""
    if name == "torch":
        return None
    status = runtime_status(name)
    if not status.live:
        return status.reason
    if name == "native":
        return None if device.type == "cpu" else f"tensors are on {device}; the native backend runs on the CPU"
    if device.type == "cuda":
        return None
    if name == "triton" and device.type == "cpu" and status.on_cpu:
        return None
    return f"tensors are on {device}, and the {name} backend needs a CUDA device"


def requested_backend() -> str:
    """The value of SPECTRALKERN_BACKEND, validated ('auto' when unset)."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return "auto"
    value = value.strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {value!r}")
    return value


@contextlib.contextmanager
def forced(backend: str) -> Iterator[None]:
    """Within the block every dispatch runs as if SPECTRALKERN_BACKEND=backend (validated first); the previous
    value, or its absence, comes back on exit. For peers timed side by side (the benchmarks)."""
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = backend
    try:
        requested_backend()
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


# ------------------------------------------------------------------------------------------ the decision
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _table_reason(entry: Backend, dtype: torch.dtype, facts: Mapping[str, object]) -> str | None:
    """Why the table rules ``entry`` out for these facts, or None."""
    if dtype not in entry.dtypes:
        return f"dtype {_dtype_name(dtype)} not in ({', '.join(map(_dtype_name, entry.dtypes))})"
    for fact, limit in entry.limits.items():
        value = facts.get(fact)
        if value is not None and int(value) > limit:
            return f"{fact} = {value} > {limit}"
    for fact, meaning in entry.requires.items():
        if fact in facts and not facts[fact]:
            return f"needs {fact} ({meaning})"
    if entry.state_dtypes is not None and facts.get("state_dtype") is not None:
        allowed = entry.state_dtypes.get(dtype, ())
        if facts["state_dtype"] not in allowed:
            return (f"moments of dtype {_dtype_name(facts['state_dtype'])} with {_dtype_name(dtype)} parameters "
                    f"(compiled: {', '.join(map(_dtype_name, allowed)) or 'none'})")
    return None


def why_not(op: str, backend: str, dtype: torch.dtype, device: torch.device | None = None,
            **facts: object) -> str | None:
    """Why ``backend`` cannot run ``op`` for these facts (the table), and on ``device`` (its runtime; skipped for
    None), or None when it can."""
    spec = _spec(op)
    entry = spec.backend(backend)
    if entry is None:
        return f"{op} has no {backend} implementation (it has {', '.join(b.name for b in spec.backends)})"
    reason = _table_reason(entry, dtype, facts)
    return reason if reason is not None or device is None else _device_reason(backend, device)


def _spec(op: str) -> OpSpec:
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    return OPS[op]


def _pick_algorithm(spec: OpSpec, backend: str, facts: Mapping[str, object],
                    forced: str | tuple[str, ...] | None) -> str | None:
    candidates = [a for a in spec.algorithms if backend in a.backends]
    if not candidates:
        if forced is not None:
            raise BackendUnavailable(f"{spec.name} has no algorithm {forced!r} on the {backend} backend")
        return None
    if forced is None and any(f not in facts for a in candidates for f in a.needs):
        return None  # the caller asked which backend only
    runnable = [a for a in candidates if all(facts.get(f, False) for f in a.requires)]
    if forced is not None:
        return _first_runnable(spec, backend, (forced,) if isinstance(forced, str) else forced, candidates, runnable,
                               facts)
    if not runnable:  # the table lists an unconditional algorithm for every backend that has any
        raise RuntimeError(f"{spec.name}: no algorithm of the {backend} backend applies to {dict(facts)}")
    costs = [(a.cost(facts) if a.cost is not None else 0.0, i) for i, a in enumerate(runnable)]
    return runnable[min(costs)[1]].name


def _first_runnable(spec: OpSpec, backend: str, names: tuple[str, ...], candidates: list[Algorithm],
                    runnable: list[Algorithm], facts: Mapping[str, object]) -> str:
    """The first of the forced ``names`` that can run (a preference order: "lanczos, else dense"), or
    BackendUnavailable naming what each one needs."""
    matches = []
    for name in names:
        match = next((a for a in candidates if a.name == name), None)
        if match is None:
            raise BackendUnavailable(f"{spec.name} has no algorithm {name!r} on the {backend} backend (it has "
                                     f"{', '.join(a.name for a in candidates)})")
        if match in runnable:
            return name
        matches.append(match)
    missing = ["; ".join(f"{f} ({m})" for f, m in a.requires.items() if not facts.get(f, False)) for a in matches]
    if len(matches) == 1:
        raise BackendUnavailable(f"{spec.name}: algorithm {names[0]!r} cannot run here: needs {missing[0]}")
    raise BackendUnavailable(f"{spec.name}: none of the algorithms {', '.join(map(repr, names))} can run here: "
                             + "; ".join(f"{a.name} needs {why}" for a, why in zip(matches, missing)))


def algorithm_of(op: str, backend: str, **facts: object) -> str | None:
    """The algorithm ``op`` runs on ``backend`` for these facts (the cost model alone: no runtime or device
    check), None when the backend has one way only."""
    return _pick_algorithm(_spec(op), backend, facts, None)


def backend_of(op: str, *tensors: torch.Tensor | None, backend: str | None = None,
               algorithm: str | tuple[str, ...] | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               **facts: object) -> Choice:
    """Which backend (and algorithm) runs ``op`` on these inputs, and why not the others.

    Args:
        op: a name in ``OPS`` ("spectral_filter", "adamw_update", ...).
        tensors: the op's main input first (x, the parameter, the query); its dtype and device decide unless
            ``dtype`` / ``device`` are given. None entries are skipped.
        backend: force one ("cuda", "triton", "native", "torch"); None or "auto": SPECTRALKERN_BACKEND (for the ops
            that follow it, ``OpSpec.follows_env``), else auto.
        algorithm: force one of the op's algorithms on the chosen backend, or a tuple of them in order of preference:
            the first that can run (BackendUnavailable when none can).
        facts: the size and layout facts the table's entries test (k, rank, head_dim, dim, state_dtype,
            dense_state, uniform, blocks, max_block, rows, ...; see ``OPS``); hashable values.
    Returns:
        a Choice. Raises BackendUnavailable when the forced backend or algorithm cannot run (the message names the
        reason), ValueError for an unknown op or backend name.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    first = tensors[0] if tensors and tensors[0] is not None else next((t for t in tensors if t is not None), None)
    if dtype is None or device is None:
        if first is None:
            raise ValueError(f"backend_of({op!r}) needs a tensor or both dtype= and device=")
        dtype = first.dtype if dtype is None else dtype
        device = first.device if device is None else device
    if not isinstance(device, torch.device):
        device = torch.device(device)
    forced = (backend.strip().lower() if backend is not None
              else requested_backend() if OPS[op].follows_env else "auto")
    if forced not in BACKENDS and forced != "auto":
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    source = "backend=" if backend is not None and forced != "auto" else f"{ENV_VAR}="
    return _decide(op, dtype, device, forced, source, algorithm, tuple(facts.items()), _runtimes(OPS[op]))


def _runtimes(spec: OpSpec) -> tuple[object, ...]:
    """What the decision reads besides its arguments: the statuses of the op's runtimes (in the cache key, so a test
    that swaps a status gets fresh answers). Only the op's own: asking the eigensolver does not import triton."""
    return tuple(triton_status() if entry.name == "triton" else _extensions.status(entry.name)
                 for entry in spec.backends if entry.name != "torch")


@functools.lru_cache(maxsize=4096)
def _decide(op: str, dtype: torch.dtype, device: torch.device, forced: str, source: str,
            algorithm: str | tuple[str, ...] | None,
            facts_items: tuple[tuple[str, object], ...], runtimes: tuple[object, ...]) -> Choice:
    """backend_of's decision (cached: an op asks on every call, and the answer is a few µs from the cache)."""
    spec = OPS[op]
    facts = dict(facts_items)
    reasons = {entry.name: why_not(op, entry.name, dtype, device, **facts) for entry in spec.backends}
    if forced not in reasons and forced != "auto":
        raise BackendUnavailable(f"{op}: {source}{forced} cannot run here: {op} has no {forced} "
                                 f"implementation (it has {', '.join(reasons)})")
    if forced != "auto":
        if reasons[forced] is not None:
            raise BackendUnavailable(f"{op}: {source}{forced} cannot run here: {reasons[forced]}")
        chosen = forced
    else:
        chosen = next(name for name, why in reasons.items() if why is None)  # torch always can
    rejected = {name: (why if why is not None else (f"forced {chosen}" if forced != "auto"
                                                    else f"{chosen} is preferred"))
                for name, why in reasons.items() if name != chosen}
    return Choice(op, chosen, _pick_algorithm(spec, chosen, facts, algorithm), MappingProxyType(rejected),
                  forced=forced != "auto")


def table() -> list[dict[str, str]]:
    """The registry as rows (op, backend, dtypes, limits, requires, algorithms, runtime) for ``spectralkern info``
    and the docs."""
    rows = []
    for spec in OPS.values():
        for entry in spec.backends:
            limits = ", ".join(f"{fact} ≤ {limit}" for fact, limit in entry.limits.items())
            needs = ", ".join(entry.requires)
            if entry.state_dtypes is not None:
                needs = ", ".join(filter(None, (needs, "state dtype pairs")))
            algorithms = ", ".join(a.name for a in spec.algorithms if entry.name in a.backends)
            status = runtime_status(entry.name)
            rows.append({"op": spec.name, "backend": entry.name,
                         "dtypes": " ".join(_dtype_name(d).replace("float", "f").replace("bf16", "bf16")
                                            for d in entry.dtypes),
                         "limits": limits or "-", "requires": needs or "-", "algorithms": algorithms or "-",
                         "runtime": "live" if status.live else "off"})
    return rows

"""Communication added by the spectral method per training step, and step time on 1 vs 2 processes —
``python benchmarks/bench_distributed.py [--steps 30] [--width 512] [--out FILE]``.

A model of ``--layers`` square Linear layers (width × width, every weight targeted: blocks of 128 rows, k = 16,
heat gains) trains on one process and on two (gloo over loopback, CPU, one torch thread per process), under
FSDP2 and DDP, with and without the spectral filter. Per step and rank it records:

- bytes handed to collectives (their inputs), by collective: every ``torch.distributed`` collective function is
  wrapped (FSDP2's all-gathers and reduce-scatters, our all-reduce), and DDP's buckets go through its stock
  Python all-reduce comm hook, so they are counted too;
- bytes the process wrote to sockets (``wchar`` of ``/proc/self/io``: the loop does no file I/O, so this is
  gloo's traffic, protocol included): an independent check that nothing escaped the wrappers;
- the median step time (forward, backward, optimizer).

Modes: ``adamw`` (torch AdamW, the baseline), ``spectral_adamw`` (SpectralAdamW), ``spectral_adamw_reg`` (plus
the Laplacian regulariser in the loss) and, for DDP, the two ways to filter replicated gradients:
``filter_redundant`` (every rank filters every block: filt.step(), then torch AdamW) and ``filter_split_gather``
(rank r filters its half of the blocks, then an all-gather rebuilds the gradient, then torch AdamW).

Writes one JSON object (device, torch version, date, load average, every measurement) to ``--out``
(default ``benchmarks/results/distributed/cpu.json``) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

try:
    import spectralkern as sk
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import spectralkern as sk

from spectralkern.basis import SpectralBasis
from spectralkern.distributed import shard_bounds

BLOCK, K = 128, 16
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "all_to_all_single", "send", "recv",
                "isend", "irecv")


# ------------------------------------------------------------------------------------------ counting
class Counter:
    """Bytes handed to collectives since the last ``reset``, by collective name."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def add(self, name: str, nbytes: int) -> None:
        self.bytes[name] = self.bytes.get(name, 0) + nbytes

    def reset(self) -> None:
        self.bytes = {}


COUNTER = Counter()


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def wrap_collectives() -> None:
    """Count the input bytes of every collective called through ``torch.distributed`` (also when reached as
    ``torch.distributed.distributed_c10d.<name>``)."""
    for name in _COLLECTIVES:
        original = getattr(dist.distributed_c10d, name)

        signature = inspect.signature(original)
        # The input is the second parameter of the gather/scatter forms (after the output), the first otherwise.
        sent_at = 1 if name.startswith(("all_gather", "reduce_scatter", "all_to_all")) else 0
        sent_name = list(signature.parameters)[sent_at]

        @functools.wraps(original)
        def counted(*args, _original=original, _name=name, _signature=signature, _sent=sent_name, **kwargs):
            COUNTER.add(_name, _nbytes(_signature.bind(*args, **kwargs).arguments[_sent]))
            return _original(*args, **kwargs)

        setattr(dist.distributed_c10d, name, counted)
        setattr(dist, name, counted)


def socket_bytes_written() -> int:
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("wchar:")).split()[1])


# ------------------------------------------------------------------------------------------ the model
def make_model(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])


def make_filter(model: nn.Module, reg: bool, world: int) -> sk.SpectralGradientFilter:
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return sk.SpectralGradientFilter(model, targets, block_size=BLOCK, k=K, knn=8, refresh_every=0,
                                     reg_weight=1e-3 if reg else 0.0, align_shards=(world,))


def split_gather_filter(filt: sk.SpectralGradientFilter, rank: int, world: int) -> None:
    """The alternative for replicated gradients: rank r filters the blocks of rows bounds[r]:bounds[r+1] (the
    layout is aligned with those cuts), then an all-gather of the filtered rows rebuilds every gradient."""
    for t in filt.filter_targets:
        grad = t.param.grad
        bounds = shard_bounds(grad.shape[0], world)
        chunk = bounds[1]
        lo, hi = bounds[rank], bounds[rank + 1]
        ptr = t.basis.block_ptr
        first, last = int((ptr == lo).nonzero()[0]), int((ptr == hi).nonzero()[-1])
        local = SpectralBasis(t.basis.U[lo:hi], t.basis.eigenvalues[first:last], ptr[first:last + 1] - lo)
        mine = torch.zeros(chunk, grad.shape[1], dtype=grad.dtype)
        mine[:hi - lo] = sk.spectral_filter(grad[lo:hi], local, t.gains[first:last], passthrough=filt.passthrough)
        gathered = torch.empty(chunk * world, grad.shape[1], dtype=grad.dtype)
        dist.all_gather_single(gathered, mine)
        grad.copy_(torch.cat([gathered[r * chunk:r * chunk + bounds[r + 1] - bounds[r]] for r in range(world)]))


# ------------------------------------------------------------------------------------------ one measurement
def measure(engine: str, mode: str, args: argparse.Namespace, rank: int, world: int) -> dict:
    """Train ``args.steps`` steps (after 3 warm-up steps) and return the per-step bytes and times of this rank."""
    model = make_model(args.width, args.layers)
    wrapped = model
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif engine == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        # DDP's C++ reducer talks to the process group directly; its stock Python hook (the same bucket
        # all-reduce and average) routes the traffic through the counted dist.all_reduce.
        wrapped.register_comm_hook(None, allreduce_hook)
    filt = None if mode == "adamw" else make_filter(model, reg=mode == "spectral_adamw_reg", world=world)
    if mode.startswith("spectral_adamw"):
        opt = sk.SpectralAdamW(model.parameters(), lr=1e-4, spectral_filter=filt)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    times, collective_bytes, socket_bytes = [], [], []
    for step in range(args.steps + 3):
        x = torch.randn(args.batch // world, args.width, generator=gen)
        COUNTER.reset()
        written = socket_bytes_written()
        start = time.perf_counter()
        loss = wrapped(x).square().mean()
        if filt is not None and filt.reg_weight:
            loss = loss + filt.regularization()
        loss.backward()
        if mode == "filter_redundant":
            filt.step()
        elif mode == "filter_split_gather":
            split_gather_filter(filt, rank, world)
        opt.step()
        opt.zero_grad()
        elapsed = time.perf_counter() - start
        if step >= 3:
            times.append(elapsed)
            collective_bytes.append(dict(COUNTER.bytes))
            socket_bytes.append(socket_bytes_written() - written)
    per_collective = {name: int(statistics.median(c.get(name, 0) for c in collective_bytes))
                      for name in sorted({n for c in collective_bytes for n in c})}
    return {"engine": engine, "mode": mode, "world_size": world, "rank": rank,
            "median_step_ms": 1e3 * statistics.median(times), "p20_step_ms": 1e3 * _quantile(times, 0.2),
            "p80_step_ms": 1e3 * _quantile(times, 0.8), "collective_bytes_per_step": per_collective,
            "collective_bytes_total": sum(per_collective.values()),
            "socket_bytes_written_per_step": int(statistics.median(socket_bytes)) if world > 1 else 0}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


CASES = {1: [("single", "adamw"), ("single", "spectral_adamw"), ("single", "spectral_adamw_reg")],
         2: [("fsdp2", "adamw"), ("fsdp2", "spectral_adamw"), ("fsdp2", "spectral_adamw_reg"),
             ("ddp", "adamw"), ("ddp", "spectral_adamw"), ("ddp", "filter_redundant"),
             ("ddp", "filter_split_gather")]}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    wrap_collectives()
    try:
        records = []
        for engine, mode in CASES[world]:
            dist.barrier()
            records.append(measure(engine, mode, args, rank, world))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, records)
        if rank == 0:
            Path(out).write_text(json.dumps([r for rank_records in gathered for r in rank_records]))
    finally:
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace, scratch: Path) -> list[dict]:
    if world == 1:
        torch.set_num_threads(1)
        return [measure(engine, mode, args, 0, 1) for engine, mode in CASES[1]]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = scratch / f"bench_distributed_{os.getpid()}_{world}.json"
    mp.spawn(_worker, args=(world, port, args, str(out)), nprocs=world)
    records = json.loads(out.read_text())
    out.unlink()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case (after 3 warm-up steps)")
    parser.add_argument("--width", type=int, default=512, help="rows = columns of every Linear")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distributed" / "cpu.json"))
    args = parser.parse_args(argv)
    scratch = Path(args.out).parent
    scratch.mkdir(parents=True, exist_ok=True)
    records = run(1, args, scratch) + run(2, args, scratch)
    baseline = {(r["engine"], r["rank"]): r["collective_bytes_total"] for r in records if r["mode"] == "adamw"}
    for r in records:
        r["collective_bytes_added"] = r["collective_bytes_total"] - baseline[(r["engine"], r["rank"])]
    report = {"benchmark": "distributed", "device": f"cpu ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores)", "backend": "gloo (loopback)", "torch": torch.__version__,
              "spectralkern": sk.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "load_average_at_end": os.getloadavg(), "threads_per_process": 1,
              "config": {"width": args.width, "layers": args.layers, "batch": args.batch, "steps": args.steps,
                         "block_size": BLOCK, "k": K},
              "records": records}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'engine':7} {'mode':20} {'W':>2} {'rank':>4} {'step ms':>9} {'coll. bytes':>12} {'added':>10} "
          f"{'socket bytes':>13}")
    for r in records:
        print(f"{r['engine']:7} {r['mode']:20} {r['world_size']:>2} {r['rank']:>4} {r['median_step_ms']:9.2f} "
              f"{r['collective_bytes_total']:>12,} {r['collective_bytes_added']:>10,} "
              f"{r['socket_bytes_written_per_step']:>13,}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

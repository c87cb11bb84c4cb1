"""`spectralkern info | bench | demo | example`."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

import torch

from . import _backend, _extensions, _logging


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _table_lines() -> list[str]:
    rows = _backend.table()
    columns = ("op", "backend", "runtime", "dtypes", "limits", "requires", "algorithms")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  " + "  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  " + "  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return lines


def info() -> int:
    """Print versions, devices, the backends' runtimes (and why the others are off), the registry's table, and what
    it picks for each op on each device."""
    from . import __version__

    print(f"spectralkern {__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for package in ("torch", "triton", "numpy", "scipy", "cupy"):
        print(f"{package:<12} {_version(package)}")
    print(f"torch CUDA   {torch.version.cuda or 'none (CPU build)'}")
    print(f"cuda ext     {_extensions.describe_build('cuda')}")
    print(f"native ext   {_extensions.describe_build('native')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"device {i}     {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("devices      CPU only (no CUDA device visible)")
    print()
    print("backends (tried in this order under auto):")
    for status in _backend.all_status():
        mark = "live" if status.live else "off "
        print(f"  {status.name:<7} {mark}  {status.reason}")
    print()
    print("registry (per op, the backends in auto's order; limits and requirements are checked per call):")
    print("\n".join(_table_lines()))
    try:
        requested = _backend.requested_backend()
    except ValueError as exc:
        print(f"\n{exc}")
        return 2
    print(f"\n{_backend.ENV_VAR}={os.environ.get(_backend.ENV_VAR, '')!r} -> {requested}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"chosen for a float32 input on {device.type}:")
        for op in _backend.OPS:
            try:
                choice = _backend.backend_of(op, dtype=torch.float32, device=device)
                chosen = choice.backend
                needs = _backend.OPS[op].backend(chosen).requires
                if needs:  # the call's own facts decide these; info asks without them
                    chosen += f" (when {', '.join(needs)}; else the next backend of the table that can run)"
            except _backend.BackendUnavailable as exc:
                chosen = f"error: {exc}"
            print(f"  {op} on {device.type}: {chosen}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectralkern", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what takes time: -v INFO (filter construction, adapter setup), -vv DEBUG")
    parser.add_argument("--log-level", choices=_logging.LEVELS, type=str.upper, help="overrides -v")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and live backends")
    sub.add_parser("bench", help="run the kernel benchmarks (see `spectralkern bench --help`)", add_help=False)
    sub.add_parser("demo", help="the fine-tuning comparison (see `spectralkern demo --help`)", add_help=False)
    sub.add_parser("example", help="the worked example: graph, basis, filtered gradient of a real weight",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    _logging.configure(_logging.level_from_flags(args.log_level, args.verbose))
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    if args.command == "example":
        from .example import main as example_main
        return example_main(rest)
    from .demo import main as demo_main
    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())

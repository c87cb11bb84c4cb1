"""`spectralkern info | bench | demo | example`."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

import torch

from . import _backend, _cuda_ext, _logging


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    """Print versions, devices, and which backends are live (and why the others are not)."""
    from . import __version__

    print(f"spectralkern {__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for package in ("torch", "triton", "numpy", "scipy", "cupy"):
        print(f"{package:<12} {_version(package)}")
    print(f"torch CUDA   {torch.version.cuda or 'none (CPU build)'}")
    print(f"cuda ext     {_cuda_ext.describe_build()}")
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
    try:
        requested = _backend.requested_backend()
    except ValueError as exc:
        print(f"\n{exc}")
        return 2
    print(f"\n{_backend.ENV_VAR}={os.environ.get(_backend.ENV_VAR, '')!r} -> {requested}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            chosen = _backend.backend_for(device, _backend.BACKENDS)
        except RuntimeError as exc:
            chosen = f"error: {exc}"
        print(f"spectral_filter on {device.type}: {chosen}")
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

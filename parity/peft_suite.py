"""``python -m parity peft-tests``: PEFT's own test suite, run with PEFT and with ``minilora.compat``.

    python -m parity peft-tests --peft-src ~/src/peft             # a PEFT source checkout (its tests/ is used)
    python -m parity peft-tests --peft-src ~/src/peft/tests --all-lora --json out.json --markdown out.md

PEFT's tests are the oracle's own idea of correct behaviour. This runs a test file of a PEFT checkout
(``tests/test_custom_models.py`` by default) twice, each in a pytest subprocess with the plugin
``parity.peft_plugin``: once as it is ("peft" mode), once with ``get_peft_model``, ``PeftModel`` and
``LoraConfig`` taken from ``minilora.compat`` ("minilora" mode). Then, test by test:

    agree     both pass
    differ    PEFT passes, minilora fails (the first line of its error is shown) or does not run it
    refused   PEFT passes, minilora raises a MiniLoraError for a feature outside its scope (DoRA,
              Conv2d/3d, Embedding, target_parameters, VeLoRA, MiCA, trainable tokens, ...)
    N/A       PEFT skips the test, or fails it itself: no oracle to compare with

The tests are read from the checkout at run time; none of PEFT's test code is part of minilora.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = "test_custom_models.py"
DEFAULT_TIMEOUT_S = 3600
AGREE, DIFFER, REFUSED, NA = "agree", "differ", "refused", "N/A"
VERDICTS = (AGREE, DIFFER, REFUSED, NA)

# Features outside minilora's scope (minilora.adapter_config.UNSUPPORTED_FIELDS, and layers other than
# nn.Linear / Conv1D), and how the first sentence of a MiniLoraError names them. Only a MiniLoraError
# that names one of these is a refusal; any other failure, MiniLoraError or not, is a difference.
OUT_OF_SCOPE = {
    "DoRA": r"use_dora|\bDoRA\b",
    "target_parameters": r"target_parameters",
    "trainable tokens": r"trainable_token",
    "VeLoRA": r"(?i)velora",
    "MonteCLoRA": r"(?i)monteclora",
    "BD-LoRA": r"use_bdlora|BD-LoRA",
    "init_lora_weights (MiCA, PiSSA, ...)": r"init_lora_weights(=\S+)? (must be|is one of PEFT's)|minilora knows True, False",
    "other LoRA variants (LoftQ, EVA, CorDA, QA-LoRA, aLoRA, Arrow, KaSA, LoRA-GA, ...)":
        r"layer_replication|loftq_config|megatron_config|use_qalora|eva_config|corda_config|alora_invocation_tokens"
        r"|arrow_config|kasa_config|lora_ga_config",
    "PeftMixedModel (LoRA mixed with other PEFT methods)": r"mixed=True|PeftMixedModel",
    "other PEFT methods (IA3, LoHa, ...)": r"is another PEFT method",
    "ensure_weight_tying of tied modules_to_save (one shared trained copy)":
        r"ensure_weight_tying=True with a tied layer in modules_to_save",
    "Embedding": r"\bEmbedding\b",
    "Conv1d/Conv2d/Conv3d": r"\bConv[123]d\b",
    "LoRA conversion (convert_to_lora)": r"supports_lora_conversion|convert_to_lora",
    "MultiheadAttention": r"MultiheadAttention",
    "a layer other than nn.Linear / Conv1D": r"wraps nn\.Linear or",
}


class UsageError(Exception):
    """A bad command line or a folder without tests: one ``error:`` line, exit status 2."""


# ------------------------------------------------------------------------------------------------
# where the tests are
# ------------------------------------------------------------------------------------------------
def find_tests_dir(peft_src: str | os.PathLike) -> Path:
    """The tests/ folder of a PEFT checkout, given the checkout or the tests/ folder itself."""
    path = Path(peft_src).expanduser().resolve()
    if not path.is_dir():
        raise UsageError(f"--peft-src {peft_src}: no such directory (pass a PEFT source checkout or its tests/ folder)")
    for candidate in (path / "tests", path):
        if candidate.is_dir() and any(candidate.glob("test_*.py")):
            return candidate
    raise UsageError(f"--peft-src {peft_src}: no tests found (neither it nor a tests/ folder in it holds test_*.py "
                     "files); pass a PEFT source checkout, e.g. git clone https://github.com/huggingface/peft")


def find_test_files(tests_dir: Path, names: list[str]) -> list[Path]:
    files = []
    for name in names:
        path = tests_dir / Path(name).name if not Path(name).is_absolute() else Path(name)
        if not path.is_file():
            raise UsageError(f"--file {name}: not found in {tests_dir}")
        files.append(path)
    return files


def source_version(tests_dir: Path) -> str:
    """Which PEFT the tests come from: the checkout's src/peft/__init__.py, else git describe, else unknown."""
    init = tests_dir.parent / "src" / "peft" / "__init__.py"
    if init.is_file():
        found = re.search(r'__version__\s*=\s*["\']([^"\']+)', init.read_text(errors="replace"))
        if found:
            return f"peft {found.group(1)} (src/peft/__init__.py)"
    try:
        done = subprocess.run(["git", "-C", str(tests_dir), "describe", "--tags", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return f"git {done.stdout.strip()}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (pass --label)"


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("peft", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        versions["minilora"] = f"git {done.stdout.strip()}" if done.returncode == 0 else "?"
    except (OSError, subprocess.TimeoutExpired):
        versions["minilora"] = "?"
    return versions


# ------------------------------------------------------------------------------------------------
# running pytest in one mode
# ------------------------------------------------------------------------------------------------
@dataclass
class ModeRun:
    """What one pytest subprocess reported: a record per test (parity.peft_plugin's JSON lines)."""

    mode: str
    selected: int | None = None  # None: pytest stopped before choosing the tests (an import or collection error)
    replaced: list[str] = field(default_factory=list)
    stand_ins: list[str] = field(default_factory=list)  # hub ids loaded as parity.peft_offline_models' stand-ins
    collect_errors: list[str] = field(default_factory=list)  # "file: last line of the error"
    records: dict[str, dict] = field(default_factory=dict)
    returncode: int | None = None
    timed_out: bool = False
    log_tail: str = ""
    seconds: float = 0.0


def _subprocess_env(mode: str, scope: str, select: str, cases: list[str], out: Path, threads: int,
                    offline_models: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PARITY_PEFT_MODE=mode, PARITY_PEFT_SCOPE=scope, PARITY_PEFT_SELECT=select, PARITY_PEFT_CASES="|".join(cases),
               PARITY_PEFT_OUT=str(out), HF_HUB_OFFLINE="1", PARITY_PEFT_OFFLINE_MODELS="1" if offline_models else "0",
               PYTHONDONTWRITEBYTECODE="1")  # write no __pycache__ into the user's checkout
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def run_mode(mode: str, files: list[Path], scope: str = "linear-conv1d", select: str = "cases", cases: list[str] = (),
             keyword: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 1, offline_models: bool = True,
             on_record: Callable[[dict], None] = lambda record: None) -> ModeRun:
    """Run pytest on ``files`` with parity.peft_plugin in ``mode``; ``on_record`` sees each test as it ends."""
    run = ModeRun(mode)
    with tempfile.TemporaryDirectory(prefix="parity-peft-tests-") as scratch:
        scratch = Path(scratch)
        out, log, ini = scratch / "outcomes.jsonl", scratch / "pytest.log", scratch / "pytest.ini"
        ini.write_text("[pytest]\n")  # not the checkout's settings (coverage, strict markers ...): the tests alone
        command = [sys.executable, "-m", "pytest", "-p", "parity.peft_plugin", "-c", str(ini),
                   "--rootdir", str(files[0].parent.parent), "-p", "no:cacheprovider", "-q", "--tb=no",
                   *(["-k", keyword] if keyword else []), *map(str, files)]
        start = time.monotonic()
        read = 0

        def take_new_lines() -> None:
            nonlocal read
            if not out.exists():
                return
            with open(out, encoding="utf-8") as lines:
                lines.seek(read)
                for line in iter(lines.readline, ""):
                    if not line.endswith("\n"):
                        break  # a line still being written: read it next time
                    read += len(line.encode("utf-8"))
                    record = json.loads(line)
                    if "selected" in record:
                        run.selected, run.replaced = record["selected"], record["replaced"]
                    elif "stand_ins" in record:
                        run.stand_ins = record["stand_ins"]
                        continue
                    elif "collect_error" in record:
                        run.collect_errors.append(f"{record['collect_error']}: {record['message']}")
                    else:
                        run.records[record["id"]] = record
                    on_record(record)

        with open(log, "w") as log_file:  # cwd: the scratch folder, so tests that write files write there
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=scratch,
                                       env=_subprocess_env(mode, scope, select, list(cases), out, threads,
                                                           offline_models))
            try:
                while run.returncode is None:
                    try:
                        run.returncode = process.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        if time.monotonic() - start > timeout_s:
                            process.kill()
                            run.returncode, run.timed_out = process.wait(), True
                    take_new_lines()
            finally:  # Ctrl-C or an error here: the tests stop too
                if process.poll() is None:
                    process.kill()
                    process.wait()
        take_new_lines()
        run.seconds = time.monotonic() - start
        run.log_tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
    return run


# ------------------------------------------------------------------------------------------------
# comparing the two runs
# ------------------------------------------------------------------------------------------------
def out_of_scope_feature(message: str) -> str | None:
    """The out-of-scope feature the first sentence of a MiniLoraError's message names, or None.

    Only the first sentence: it says what was wrong; the rest may list every field minilora has."""
    problem = re.split(r"\.\s", message, maxsplit=1)[0]
    return next((feature for feature, pattern in OUT_OF_SCOPE.items() if re.search(pattern, problem)), None)


def _error_line(record: dict) -> str:
    error = record.get("error") or {}
    text = ": ".join(part for part in (error.get("type"), error.get("message")) if part) or "no error recorded"
    return f"{text} ({error['where']})" if error.get("where") else text


def classify(peft: dict | None, minilora: dict | None, missing: str = "") -> tuple[str, str]:
    """(verdict, detail) for one test from its two records; ``missing`` says why a record may be absent."""
    if peft is None:
        return NA, f"not run with PEFT{missing and f' ({missing})'}"
    if peft["outcome"] in ("skipped", "xfailed"):
        return NA, f"{peft['outcome']} with PEFT: {peft.get('reason', '')}".rstrip(": ")
    if peft["outcome"] != "passed":
        return NA, f"fails with PEFT: {_error_line(peft)}"
    if minilora is None:
        return DIFFER, f"not run with minilora{missing and f' ({missing})'}"
    if minilora["outcome"] == "passed":
        return AGREE, ""
    if minilora["outcome"] in ("skipped", "xfailed"):
        return DIFFER, f"{minilora['outcome']} with minilora: {minilora.get('reason', '')}".rstrip(": ")
    error = minilora.get("error") or {}
    feature = out_of_scope_feature(error.get("message", "")) if error.get("refusal") else None
    if feature:
        return REFUSED, f"{feature}: {error['message']}"
    return DIFFER, _error_line(minilora)


def compare(peft: ModeRun, minilora: ModeRun) -> list[dict]:
    """A row per test (PEFT's order, then any only minilora ran): function, case, verdict, detail, both records."""
    why = "its run timed out" if minilora.timed_out else f"cannot collect {minilora.collect_errors[0]}" \
        if minilora.collect_errors else "pytest stopped before running it" if minilora.selected is None else ""
    rows = []
    for test_id in [*peft.records, *(i for i in minilora.records if i not in peft.records)]:
        a, b = peft.records.get(test_id), minilora.records.get(test_id)
        verdict, detail = classify(a, b, missing=why)
        known = a or b
        rows.append({"id": test_id, "file": test_id.split("::")[0].rsplit("/", 1)[-1],
                     "function": known["function"], "case": known.get("test_name") or _parameter_id(test_id),
                     "model_id": known.get("model_id"), "verdict": verdict, "detail": detail,
                     "peft": a, "minilora": b})
    return rows


def _parameter_id(test_id: str) -> str:
    """``test_a[x-y]`` -> ``x-y``: pytest's name for a parametrized copy."""
    found = re.search(r"\[(.*)\]$", test_id)
    return found.group(1) if found else ""


def counts(rows: list[dict]) -> dict[str, int]:
    return {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in VERDICTS}


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
EPILOG = """
outcomes, test by test:
  agree     the test passes with PEFT and with minilora.compat
  differ    it passes with PEFT and fails with minilora (the first line of the error is shown), or
            minilora skips it or never runs it
  refused   it passes with PEFT, and minilora raises a MiniLoraError naming a feature outside its scope
            (DoRA, Conv1d/2d/3d, Embedding, MultiheadAttention, target_parameters, VeLoRA, MonteCLoRA,
            BD-LoRA, MiCA and the other init_lora_weights methods, trainable tokens, mixed=True, other
            PEFT methods, ensure_weight_tying on tied modules_to_save, LoRA conversion, ...)
  N/A       PEFT skips it (or fails it): there is no oracle answer

scope: by default the LoRA cases (tests parametrized with LoraConfig) on PEFT's test models built of
nn.Linear and transformers' Conv1D (MLP, MLP2, MLP_LayerNorm, EmbConv1D); --all-lora adds the other
models (Conv1d/2d/3d, MHA, bare parameters), whose cases minilora refuses. Tests parametrized with a
LoraConfig but no model_id (PEFT's multi-adapter, mixed-batch, requires-grad classes) are in both.
--select uses-lora also takes tests with no PEFT config parameter whose code names LoraConfig (PEFT's
other files, e.g. test_initialization.py). In "minilora" mode every name minilora.compat exports
(get_peft_model, PeftModel and PeftModelFor*, LoraConfig, LoraModel, the state-dict functions, ...)
replaces PEFT's in peft, peft.utils, peft.utils.other and peft.tuners.lora, and minilora's LoRA layer counts as
peft's LoraLayer / BaseTunerLayer in isinstance checks. Optional
imports of PEFT's test helpers that are not installed (diffusers, datasets) are empty stubs, in the
subprocess only. The checkout's pytest settings are not used; its files are not written to.

hub models: PEFT's model tests (test_decoder_models.py, test_encoder_decoder_models.py,
test_feature_extraction_models.py, test_seq_classifier.py) load tiny models from the Hugging Face hub,
which these offline runs cannot reach. For the ids in parity/peft_offline_models.py (OPT, GPT-2, GPT-J,
Llama, Qwen2, Gemma3, Mistral, T5, Bart, Bert, Roberta, Deberta, DebertaV2, the sequence classifiers)
from_pretrained (model classes, Auto classes, AutoConfig) loads a stand-in instead, in both modes: a
tiny random model of the same class (width 32, 2 layers, vocabulary 128) seeded from the id, so the
same id gives bitwise the same weights in every call. --no-offline-models turns that off (the ids then
load from your Hugging Face cache). No tokenizer is stood in: a test that needs one fails with PEFT (N/A).

It takes a minute or two: PEFT's test_custom_models.py has ~1300 LoRA tests in the default scope, run
once per mode (about 40 s each on a busy 2-core machine); progress goes to stderr every 10 s.

exit status: 0 when nothing differs, 1 when a test differs, 2 for a usage error (no such folder, no
tests found, an output path that cannot be written, PEFT's own run that cannot collect the tests).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parity peft-tests",
        description="Run PEFT's own test suite with PEFT and with minilora.compat, and compare the outcomes "
                    "test by test.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peft-src", required=True, metavar="DIR",
                        help="a PEFT source checkout (its tests/ folder is used) or the tests/ folder itself")
    parser.add_argument("--file", action="append", metavar="NAME",
                        help=f"a test file of that folder (default: {DEFAULT_FILE}); repeat for several")
    parser.add_argument("--all-lora", action="store_true",
                        help="every LoraConfig case, not only those on nn.Linear / Conv1D models")
    parser.add_argument("--select", choices=("cases", "uses-lora"), default="cases",
                        help="which tests: 'cases' (default), those parametrized with LoraConfig (PEFT's test cases); "
                             "'uses-lora', also tests with no PEFT config parameter whose code names LoraConfig "
                             "(for PEFT's other test files, e.g. test_initialization.py, test_tuners_utils.py)")
    parser.add_argument("--case", action="append", metavar="TEST_NAME",
                        help="only this case (PEFT's test_name, e.g. 'Vanilla MLP 1 LoRA'); repeat for several")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest's -k expression, passed to both runs")
    parser.add_argument("--json", metavar="PATH", help="write every test's outcome in both modes as JSON")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write the report as a markdown page (the NOTES block of an existing page is kept)")
    parser.add_argument("--label", metavar="TEXT",
                        help="which PEFT the tests come from, for the report (default: read from the checkout)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"stop a mode's run after this long (default: {DEFAULT_TIMEOUT_S})")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for the test runs unless already set (default: 1)")
    parser.add_argument("--no-offline-models", dest="offline_models", action="store_false",
                        help="load the hub models of PEFT's model tests (test_decoder_models.py, ...) as they are, "
                             "from the local Hugging Face cache, instead of the tiny random stand-ins built here for "
                             "the ids in parity/peft_offline_models.py (default: the stand-ins, in both modes)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


class Progress:
    """A line on stderr every few seconds: tests done of selected, and the verdicts so far."""

    def __init__(self, mode: str, quiet: bool, peft: ModeRun | None = None, every_s: float = 10.0):
        self.mode, self.quiet, self.peft, self.every_s = mode, quiet, peft, every_s
        self.start = self.last = time.monotonic()
        self.selected, self.done = None, 0
        self.verdicts = dict.fromkeys(VERDICTS, 0)

    def __call__(self, record: dict) -> None:
        if "selected" in record:
            self.selected = record["selected"]
            self.say(f"{self.mode}: {self.selected} tests selected")
            return
        self.done += 1
        if self.peft is not None:
            self.verdicts[classify(self.peft.records.get(record["id"]), record)[0]] += 1
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.say(self.line())

    def line(self) -> str:
        of = f"/{self.selected} ({100 * self.done / self.selected:.0f}%)" if self.selected else ""
        so_far = f"; so far {', '.join(f'{n} {v}' for v, n in self.verdicts.items())}" if self.peft else ""
        return f"{self.mode}: {self.done}{of} tests, {time.monotonic() - self.start:.0f}s{so_far}"

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from parity import peft_suite_report as report

    try:
        tests_dir = find_tests_dir(args.peft_src)
        files = find_test_files(tests_dir, args.file or [DEFAULT_FILE])
        for option, path in (("--json", args.json), ("--markdown", args.markdown)):
            if path:
                _check_writable(path, option)
        if args.timeout <= 0 or args.threads < 1:
            raise UsageError("--timeout must be positive and --threads at least 1")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scope = "all-lora" if args.all_lora else "linear-conv1d"
    options = dict(scope=scope, select=args.select, cases=args.case or [], keyword=args.keyword, timeout_s=args.timeout,
                   threads=args.threads, offline_models=args.offline_models)

    installed = installed_versions()  # before the runs: the minilora commit they test
    peft_progress = Progress("peft", args.quiet)
    peft = run_mode("peft", files, on_record=peft_progress, **options)
    peft_progress.say(f"peft: {len(peft.records)} tests in {peft.seconds:.0f}s")
    if peft.collect_errors:
        hint = (" (install the package that provides it, e.g. PEFT's test extras: pip install -e '.[test]' in "
                "the checkout)") if "ModuleNotFoundError" in peft.collect_errors[0] else ""
        print(f"error: with PEFT, pytest cannot collect {peft.collect_errors[0]}{hint}", file=sys.stderr)
        return 2
    if peft.selected is None:
        print(f"error: pytest could not collect {', '.join(f.name for f in files)} with PEFT (exit status "
              f"{peft.returncode}); its last lines:\n{peft.log_tail}", file=sys.stderr)
        return 2
    if peft.selected == 0:
        print(f"error: no LoRA tests found in {', '.join(f.name for f in files)} (scope {scope}"
              f"{', --case/-k given' if args.case or args.keyword else ''})", file=sys.stderr)
        return 2
    minilora_progress = Progress("minilora", args.quiet, peft)
    minilora = run_mode("minilora", files, on_record=minilora_progress, **options)
    minilora_progress.say(minilora_progress.line())
    for error in minilora.collect_errors:
        print(f"minilora mode: pytest cannot collect {error}", file=sys.stderr)
    if minilora.selected is None:
        print(f"minilora mode: pytest stopped before running the tests (exit status {minilora.returncode}); "
              f"its last lines:\n{minilora.log_tail}", file=sys.stderr)

    rows = compare(peft, minilora)
    meta = {"command": "python -m parity peft-tests " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "tests_dir": str(tests_dir), "files": [f.name for f in files], "scope": scope, "select": args.select,
            "stand_ins": sorted(set(peft.stand_ins) | set(minilora.stand_ins)),
            "tests_from": args.label or source_version(tests_dir), "installed": installed,
            "replaced": minilora.replaced, "seconds": {"peft": round(peft.seconds), "minilora": round(minilora.seconds)},
            "timed_out": [run.mode for run in (peft, minilora) if run.timed_out], "counts": counts(rows)}
    print(report.terminal_report(rows, meta))
    try:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**meta, "tests": rows}, indent=1) + "\n")
            print(f"wrote {args.json}")
        if args.markdown:
            report.write_markdown(rows, meta, Path(args.markdown))
            print(f"wrote {args.markdown}")
    except OSError as error:
        print(f"error: could not write the report ({error}); the table is above.", file=sys.stderr)
        return 2
    return 1 if meta["counts"][DIFFER] else 0


def _check_writable(path: str, option: str) -> None:
    from minilora import MiniLoraError
    from minilora.files import check_writable

    try:
        check_writable(path, option, parents=True)
    except MiniLoraError as error:
        raise UsageError(str(error)) from None

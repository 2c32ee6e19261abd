"""The version matrix: the parity suite and the probes, run against several PEFT releases.

    python -m parity matrix --peft 0.6.2 0.12.0 0.21.2
    python -m parity matrix --peft all        # every release parity.envs knows (the latest patch of each minor)

For each release: an isolated environment (``parity.envs``: built once, cached), then two
subprocesses in it, ``python -m parity --quick --json`` and ``python -m parity.probes --json``.
The answers become two tables: a row per release with a cell per check (its statuses summed over
the grid), and per probe a row per stretch of releases that answer it the same way (so each row
is a change). Written as markdown (docs/peft-versions.md) and JSON.

The markdown keeps whatever stands between the NOTES markers of the page it overwrites: that is
where a person writes what the table means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from parity import envs
from parity.results import CHECKS

DEFAULT_MARKDOWN = envs.REPO_ROOT / "docs" / "peft-versions.md"
NOTES_BEGIN, NOTES_END = "<!-- NOTES: kept when the page is regenerated -->", "<!-- /NOTES -->"
SUITE_TIMEOUT_S = 1800
TEMPORARY = re.compile(r"/\S*/parity-[A-Za-z0-9_]+/")  # parity.suite's tempfile folder, in messages

Run = dict  # one release: {"peft", "environment", "versions", "suite": {...} | None, "probes": {...} | None, "error"}


# ------------------------------------------------------------------------------------------------
# running one release
# ------------------------------------------------------------------------------------------------
def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(envs.REPO_ROOT)  # minilora and parity from this checkout
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run_json(python: Path, module_args: list[str], log: Callable[[str], None]) -> tuple[dict | None, str]:
    """Run ``python -m <module_args> --json FILE``; (the JSON, "") or (None, why it failed)."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "out.json"
        try:
            done = subprocess.run([str(python), "-m", *module_args, "--json", str(out)], capture_output=True,
                                  text=True, env=_subprocess_env(), timeout=SUITE_TIMEOUT_S, cwd=directory)
        except subprocess.TimeoutExpired:
            return None, f"{module_args[0]} timed out after {SUITE_TIMEOUT_S}s"
        if not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return None, f"{module_args[0]} exited {done.returncode}: {tail[0][:200]}"
        return json.loads(out.read_text()), ""


def run_release(version: str, root: Path = envs.ENVS_ROOT, full: bool = False,
                log: Callable[[str], None] = print) -> Run:
    """Build (or reuse) the environment of PEFT ``version`` and run the suite and the probes in it."""
    run: Run = {"peft": version, "environment": envs.shown(envs.env_dir(version, root)), "versions": {},
                "suite": None, "probes": None, "error": ""}
    try:
        python = envs.build_env(version, root, log=log)
    except envs.EnvError as error:
        run["error"] = str(error)
        return run
    run["versions"] = json.loads((envs.env_dir(version, root) / envs.READY_FILE).read_text())
    log(f"peft {version}: running the suite")
    suite_args = ["parity", "--quiet"] + ([] if full else ["--quick"])
    run["suite"], suite_error = _run_json(python, suite_args, log)
    log(f"peft {version}: running the probes")
    run["probes"], probe_error = _run_json(python, ["parity.probes"], log)
    run["error"] = "; ".join(e for e in (suite_error, probe_error) if e)
    return run


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def check_cell(rows: list[dict]) -> str:
    """One check's rows of one release, summed: "PASS 12", "FAIL 2/12", "N/A", "PASS 9, N/A 3"."""
    if not rows:
        return "-"
    counts = {status: sum(r["status"] == status for r in rows) for status in ("PASS", "FAIL", "SKIP", "N/A")}
    if counts["FAIL"]:
        return f"**FAIL {counts['FAIL']}/{len(rows)}**"
    parts = [f"{status} {count}" for status, count in counts.items() if count]
    return ", ".join(parts)


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """Markdown code span; a value that holds a backtick needs double backticks around it."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def check_table(runs: list[Run]) -> list[list[str]]:
    """Rows of cells: a header, then one row per release (its transformers, then one cell per check)."""
    rows = [["release", "transformers", *CHECKS]]
    for run in runs:
        cells = []
        for check in CHECKS:
            if run["suite"] is None:
                cells.append("not run")
            else:
                cells.append(check_cell([r for r in run["suite"]["results"] if r["check"] == check]))
        rows.append([f"peft {run['peft']}", run["versions"].get("transformers", "-"), *cells])
    return rows


def _releases(first: str, last: str) -> str:
    return first if first == last else f"{first} - {last}"


def probe_table(runs: list[Run]) -> list[list[str]]:
    """Rows of cells: a header, then per probe one row per stretch of releases that give the same answer
    ("not run": the probes could not run in that release; "-": they ran, without this probe)."""
    rows = [["probe", "releases", "answer"]]
    for name in _probe_names(runs):
        answers = [(run["peft"], "not run" if run["probes"] is None else
                    _code(_cell_text(run["probes"][name]["value"])) if name in run["probes"] else "-")
                   for run in runs]
        stretches: list[list] = []  # [first, last, value]
        for version, value in answers:
            if stretches and stretches[-1][2] == value:
                stretches[-1][1] = version
            else:
                stretches.append([version, version, value])
        for number, (first, last, answer) in enumerate(stretches):
            rows.append([name if number == 0 else "", _releases(first, last), answer])
    return rows


def _probe_names(runs: list[Run]) -> list[str]:
    """Every probe any release answered, in the order the newest releases ask them."""
    names: list[str] = []
    for run in reversed(runs):
        names += [name for name in (run["probes"] or {}) if name not in names]
    return names


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(_cell_text(cell) if not cell.startswith("`") else cell for cell in row) + " |"
              for row in rows[1:]]
    return "\n".join(lines)


def release_notes(run: Run) -> list[str]:
    """One release's reasons: why checks FAILed or were N/A (one line per case and reason), build errors.

    The release's own number reads "this release", so releases with the same reasons group together.
    """
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for row in (run["suite"] or {}).get("results", []):
        if row["status"] in ("FAIL", "N/A"):
            checks = grouped.setdefault((row["status"], row["configuration"], row["message"]), [])
            if row["check"] not in checks:
                checks.append(row["check"])
    notes = [f"could not run everything: {run['error']}"] if run["error"] else []
    notes += [f"{status} {', '.join(checks)} ({configuration}): {message}"
              for (status, configuration, message), checks in grouped.items()]
    for name in ("peft", "PEFT"):
        notes = [note.replace(f"{name} {run['peft']} ", "this release ") for note in notes]
    return [TEMPORARY.sub("<tmp>/", note) for note in notes]  # the suite's scratch folder: new every run


def details(runs: list[Run]) -> str:
    """Per stretch of consecutive releases with the same reasons: the reasons, one line each."""
    stretches: list[list] = []  # [first, last, notes]
    for run in runs:
        notes = release_notes(run)
        if stretches and stretches[-1][2] == notes:
            stretches[-1][1] = run["peft"]
        else:
            stretches.append([run["peft"], run["peft"], notes])
    lines = []
    for first, last, notes in stretches:
        if notes:
            lines.append(f"- **peft {_releases(first, last)}**")
            lines += [f"  - {_cell_text(note)}" for note in notes]
    return "\n".join(lines) if lines else "Nothing failed and nothing was N/A."


def _questions(runs: list[Run]) -> dict[str, str]:
    """Each probe's question as the run that answered it asked it (the newest release that has it)."""
    questions: dict[str, str] = {}
    for run in reversed(runs):
        for name, answer in (run["probes"] or {}).items():
            questions.setdefault(name, answer.get("question", ""))
    return questions


def legend(runs: list[Run]) -> str:
    from parity.grid import quick_grid

    cases = "\n".join(f"  - `{case.label}`" for case in quick_grid())
    checks = "\n".join(f"  - `{name}`: {line}" for name, line in CHECKS.items())
    probes = "\n".join(f"  - `{name}`: {question}" for name, question in _questions(runs).items())
    return f"""## How to read the tables

Each PEFT release runs in its own virtual environment, with a transformers release from the same
months (the `transformers` column) and this machine's torch. Two tables:

- **The checks**: a row per release, a column per check of the parity suite
  (`python -m parity --quick`), minilora against that PEFT release on these cases:
{cases}

  The cell counts the suite's result rows by status:
  - `PASS n`: n comparisons within tolerance; on the CPU the tolerance is 0, bitwise equal;
  - `FAIL k/n`: k of n comparisons differ; *Details* below gives each reason and number;
  - `N/A n`: the release cannot express the case (rsLoRA before 0.8, plain nn.Modules in 0.3) or lacks the API a check
    calls; *Details* says which;
  - `not run`: the suite could not run in that release; *Details* says why.

  What each check compares:
{checks}
- **The probes**: one question each about the PEFT release itself, answered by measuring it
  (`python -m parity.probes`, on tiny random models; the trainable line on GPT-2 small). A row per
  stretch of consecutive releases that give the same answer, so each new row is a change;
  `absent (...)` is a release without the API, with the error it gave:
{probes}"""


def render_markdown(runs: list[Run], notes: str, command: str) -> str:
    torch_version = next((run["versions"].get("torch") for run in runs if run["versions"]), "?")
    return f"""# minilora against PEFT releases

Generated by `{command}` (torch {torch_version}, CPU).
Rebuild it with the same command; the notes block below is kept.

{NOTES_BEGIN}
{notes.strip()}
{NOTES_END}

{legend(runs)}

## The checks

{markdown_table(check_table(runs))}

## The probes

{markdown_table(probe_table(runs))}

## Details (FAIL and N/A reasons, and releases that could not run)

{details(runs)}
"""


def existing_notes(path: Path) -> str:
    if path.exists():
        text = path.read_text()
        if NOTES_BEGIN in text and NOTES_END in text:
            return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return "## Notable differences\n\n(Write what the matrix shows here; this block survives regeneration.)"


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parity matrix",
        description="Run the parity suite and the probes against several PEFT releases, each in its own "
                    "cached virtual environment, and write a version-by-check table (markdown and JSON).",
        epilog="known releases (each pinned with a transformers of its months): "
               + ", ".join(envs.COMPANIONS) + f". Environments are cached in {envs.ENVS_ROOT.name}/.",
    )
    parser.add_argument("--peft", nargs="+", metavar="VERSION",
                        help="PEFT releases, e.g. 0.6.2 0.12.0 0.21.2, or 'all' (every known release)")
    parser.add_argument("--markdown", metavar="PATH", default=str(DEFAULT_MARKDOWN),
                        help="where to write the table (default: docs/peft-versions.md)")
    parser.add_argument("--json", metavar="PATH", help="also write every answer as JSON (default: the "
                                                       "markdown path with .json)")
    parser.add_argument("--root", metavar="DIR", default=str(envs.ENVS_ROOT),
                        help="where environments are built and cached (default: .parity-envs/)")
    parser.add_argument("--full", action="store_true", help="the full grid in each release (slow), not --quick")
    parser.add_argument("--from-json", metavar="PATH",
                        help="run nothing: re-render the markdown from the JSON of an earlier run")
    return parser


def run_matrix(versions: list[str], runner: Callable[[str], Run], log: Callable[[str], None] = print) -> list[Run]:
    """One ``runner(version)`` per release, one at a time (the environments share the machine)."""
    runs = []
    for number, version in enumerate(versions, 1):
        start = time.perf_counter()
        log(f"[{number}/{len(versions)}] peft {version}")
        runs.append(runner(version))
        status = runs[-1]["error"] or "ok"
        log(f"[{number}/{len(versions)}] peft {version}: {status} ({time.perf_counter() - start:.0f}s)")
    return runs


def main(argv: list[str] | None = None, runner: Callable[[str], Run] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    markdown = Path(args.markdown)
    json_path = Path(args.json) if args.json else markdown.with_suffix(".json")
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        markdown.write_text(render_markdown(saved["runs"], existing_notes(markdown), saved["command"]))
        print(f"wrote {markdown}")
        return 0
    if not args.peft:
        parser.error("--peft VERSION [VERSION ...] is required (or --from-json PATH)")
    versions = list(envs.COMPANIONS) if args.peft == ["all"] else args.peft
    unknown = [v for v in versions if v not in envs.COMPANIONS]
    if unknown and runner is None:
        print(f"error: no transformers release is pinned for peft {', '.join(unknown)}. Known: "
              f"{', '.join(envs.COMPANIONS)} (add one to parity/envs.py COMPANIONS).", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    root = Path(args.root)
    runner = runner or (lambda version: run_release(version, root, full=args.full, log=log))
    runs = run_matrix(versions, runner, log)
    command = "python -m parity matrix --peft " + " ".join(args.peft) + (" --full" if args.full else "")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(runs, existing_notes(markdown), command))
    json_path.write_text(json.dumps({"command": command, "runs": runs}, indent=2) + "\n")
    print(markdown_table(check_table(runs)))
    print(f"\nwrote {markdown} and {json_path}")
    failed = [run["peft"] for run in runs if run["error"] or run["suite"] is None]
    return 1 if failed else 0

"""The report: versions at the top, one aligned table row per result, a one-line summary; and JSON."""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path
from typing import Iterable, TextIO

from parity.results import FAIL, NOT_APPLICABLE, PASS, STATUSES, Result

COLUMNS = ("check", "configuration", "device", "metric", "value", "tolerance", "status", "message")
MESSAGE_WIDTH = 100


def versions() -> dict[str, str]:
    """The versions a reader needs to reproduce the numbers."""
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def devices_line() -> str:
    """Which devices this machine has, so a report never stays silent about CUDA: "cpu; cuda: not available"."""
    import torch

    if torch.cuda.is_available():
        return f"cpu; cuda: {torch.cuda.get_device_name(0)}"
    return "cpu; cuda: not available"


def format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.2e}"
    return str(value)


def format_tolerance(tolerance: object) -> str:
    if tolerance is None:
        return "-"
    return "bitwise" if tolerance == 0 else f"{tolerance:.1e}"


def summary(results: Iterable[Result]) -> dict[str, int]:
    counts = Counter(result.status for result in results)
    return {status: counts.get(status, 0) for status in STATUSES}


def summary_line(results: list[Result]) -> str:
    counts = summary(results)
    verdict = "FAILED" if counts[FAIL] else "OK"
    return (f"{verdict}: {len(results)} results: {counts['PASS']} passed, {counts['FAIL']} failed, "
            f"{counts['SKIP']} skipped, {counts['N/A']} not applicable")


def table(results: list[Result]) -> str:
    """Aligned columns; long messages are cut (the JSON has them whole)."""
    cells = [COLUMNS] + [(
        r.check, r.configuration, r.device, r.metric, format_value(r.value), format_tolerance(r.tolerance),
        r.status, r.message if len(r.message) <= MESSAGE_WIDTH else r.message[:MESSAGE_WIDTH - 3] + "...",
    ) for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * len("message"))
    return "\n".join(line.rstrip() for line in lines)


def architecture_table(results: list[Result], cases: list) -> str:
    """The --arch run in one line per architecture: per selector, what PEFT and minilora chose (the
    number of layers wrapped, "both refuse", or N/A) and whether every check on it passed."""
    cells = {}
    for case in cases:
        rows = [r for r in results if r.configuration == case.label]
        [targets] = [r for r in rows if r.check == "targets"] or [None]
        chosen = ("-" if targets is None else "N/A" if targets.status == NOT_APPLICABLE
                  else f"{targets.value} layers" if isinstance(targets.value, int) else str(targets.value))
        failed = sum(r.status == FAIL for r in rows)
        passed = sum(r.status == PASS for r in rows)
        cells[(case.model.removeprefix("arch:"), case.selector)] = (
            f"{chosen}, {failed} FAIL" if failed else f"{chosen}, all {passed} rows pass"
            if isinstance(getattr(targets, "value", None), int) else chosen)
    names = list(dict.fromkeys(name for name, _ in cells))
    header = ("architecture", "target_modules=None", '"all-linear"')
    lines = [header] + [(name, cells.get((name, "default"), "-"), cells.get((name, "all-linear"), "-"))
                        for name in names]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def print_report(results: list[Result], out: TextIO) -> None:
    info = versions()
    print("  ".join(f"{name} {version}" for name, version in info.items()), file=out)
    print(f"devices: {devices_line()}", file=out)
    print(file=out)
    print(table(results), file=out)
    failures = [r for r in results if r.status == FAIL]
    if failures:
        print("\nFailures:", file=out)
        for r in failures:
            print(f"- {r.check} | {r.configuration} | {r.device} | {r.metric}: {r.message}", file=out)
    print("\n" + summary_line(results), file=out)


def to_json(results: list[Result]) -> dict:
    return {"versions": versions(), "devices": devices_line(), "summary": summary(results), "results": [r.to_dict() for r in results]}


def write_json(results: list[Result], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_json(results), indent=2) + "\n")

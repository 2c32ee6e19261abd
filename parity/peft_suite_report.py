"""The report of ``python -m parity peft-tests`` (parity/peft_suite.py): a terminal table and a markdown page.

Both say the same things: the counts of agree / differ / refused / N/A per PEFT test function, then
the differences grouped by their error (the most frequent first), the refusals by feature, and why
tests are N/A. The JSON (``--json``) keeps every test's records.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from parity.matrix import NOTES_BEGIN, NOTES_END, existing_notes, markdown_table
from parity.peft_suite import AGREE, DIFFER, NA, REFUSED, VERDICTS

WHERE = re.compile(r" \([\w.]+\.py:\d+\)$")  # "(test_custom_models.py:123)": where in PEFT's tests it stopped


def by_function(rows: list[dict], heading=lambda owner: owner) -> list[list[str]]:
    """A header, a row per test function (first-seen order) with its counts, and a total row.

    Functions of one test class (or file) follow a row that names it, ``heading(owner)``, once."""
    several_files = len({row["file"] for row in rows}) > 1
    table: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        table[f"{row['file']}::{row['function']}" if several_files else row["function"]][row["verdict"]] += 1
    body, owner = [], None
    for name, c in table.items():
        name_owner, _, function = name.rpartition("::")
        if name_owner and name_owner != owner:
            body.append([heading(name_owner), *[""] * (1 + len(VERDICTS))])
        owner = name_owner
        body.append([f"  {function}" if name_owner else function, str(sum(c.values())), *(str(c[v]) for v in VERDICTS)])
    total = Counter(row["verdict"] for row in rows)
    return [["test function", "tests", *VERDICTS], *body, ["total", str(len(rows)), *(str(total[v]) for v in VERDICTS)]]


def by_case(rows: list[dict]) -> list[list[str]]:
    """A header and a row per case (PEFT's test_name: one LoraConfig on one model) over all test functions.

    Tests parametrized without a test_name (no model_id either) are a case each: function[parameters]."""
    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for row in rows:
        model = row.get("model_id") or ""
        case = row["case"] if model else f"{_short_function(row['function'])}[{row['case']}]"
        table[case, model][row["verdict"]] += 1
    return [["case", "model", "tests", *VERDICTS]] + [
        [case, model, str(sum(c.values())), *(str(c[v]) for v in VERDICTS)] for (case, model), c in table.items()]


def groups(rows: list[dict], verdict: str, key=lambda row: WHERE.sub("", row["detail"])) -> list[tuple[str, list[dict]]]:
    """Rows with ``verdict``, grouped by ``key`` (the detail without where it stopped), largest group first."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["verdict"] == verdict:
            grouped[key(row)].append(row)
    return sorted(grouped.items(), key=lambda item: -len(item[1]))


def _feature(row: dict) -> str:
    return row["detail"].split(":", 1)[0]


def _na_reason(row: dict) -> str:
    return row["detail"].split(":", 1)[0] + (": " + row["detail"].split(":", 1)[1].strip()[:80]
                                             if ":" in row["detail"] else "")


def _short_function(name: str) -> str:
    return name.split("::")[-1]


def _examples(rows: list[dict], limit: int) -> str:
    shown = [f"{_short_function(row['function'])}[{row['case']}]" for row in rows[:limit]]
    return ", ".join(shown) + (f", ... ({len(rows) - limit} more)" if len(rows) > limit else "")


def summary_line(meta: dict) -> str:
    c = meta["counts"]
    return (f"{sum(c.values())} tests: {c[AGREE]} agree, {c[DIFFER]} differ, {c[REFUSED]} refused (out of scope), "
            f"{c[NA]} N/A")


def _text_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    rule = "-" * max(map(len, lines))
    return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


def terminal_report(rows: list[dict], meta: dict, differences_shown: int = 15) -> str:
    installed = meta["installed"]
    out = [f"\nPEFT's tests ({', '.join(meta['files'])} from {meta['tests_from']}, scope {meta['scope']}) with "
           f"peft {installed['peft']} and with minilora.compat (minilora {installed['minilora']})", "",
           _text_table(by_function(rows)) if rows else "(no tests ran)", ""]
    differ = groups(rows, DIFFER)
    if differ:
        out.append(f"differences, grouped by error ({len(differ)} kinds; --json / --markdown list every test):")
        for detail, members in differ[:differences_shown]:
            functions = len({row["function"] for row in members})
            out.append(f"  {len(members):>4} in {functions} function{'s' * (functions != 1)}: {detail[:160]}")
        if len(differ) > differences_shown:
            out.append(f"  ... {len(differ) - differences_shown} more kinds")
        out.append("")
    refused = groups(rows, REFUSED, key=_feature)
    if refused:
        out.append("refused (out of scope): " + ", ".join(f"{feature} {len(m)}" for feature, m in refused))
    not_applicable = groups(rows, NA, key=lambda row: row["detail"].split(":", 1)[0])
    if not_applicable:
        out.append("N/A: " + ", ".join(f"{reason} {len(m)}" for reason, m in not_applicable))
    if meta.get("timed_out"):
        out.append(f"timed out: {', '.join(meta['timed_out'])} (raise --timeout)")
    if meta.get("stand_ins"):
        out.append(f"hub models stood in by tiny random ones (parity/peft_offline_models.py): {len(meta['stand_ins'])}")
    out.append(summary_line(meta))
    return "\n".join(out)


def _scope(meta: dict) -> str:
    if meta["scope"] == "all-lora":
        return "every LoRA case (`--all-lora`)"
    if "test_custom_models.py" not in meta["files"]:
        return "the LoRA cases (tests parametrized with LoraConfig)"
    return ("the LoRA cases on PEFT's test models built of nn.Linear and transformers' Conv1D (MLP, MLP2, MLP_LayerNorm, "
            "EmbConv1D), and the tests parametrized with a LoraConfig but no model_id (several adapters, mixed batches, ...)")


def _stand_ins(meta: dict) -> str:
    """The bullet that names the hub models stood in by tiny random ones (parity/peft_offline_models.py), if any."""
    if not meta.get("stand_ins"):
        return ""
    return (f"- Hub models: PEFT's tests load {len(meta['stand_ins'])} models from the Hugging Face hub; offline, each "
            "is a tiny random model of the same class built here, the same in both modes (`parity/peft_offline_models.py`: "
            "the architecture's config at width 32, 2 layers, vocabulary 128; weights seeded from the id): "
            f"{', '.join(f'`{hub_id}`' for hub_id in meta['stand_ins'])}.\n")


def render_markdown(rows: list[dict], meta: dict, notes: str) -> str:
    installed = meta["installed"]
    differ = groups(rows, DIFFER)
    differences = markdown_table([["tests", "error (first line) with minilora.compat", "where PEFT's test stopped",
                                   "tests (function[case])"]] + [
        [str(len(m)), f"`{detail[:300].replace('`', '').replace('|', chr(92) + '|')}`",
         ", ".join(sorted({row["minilora"]["error"]["where"] for row in m
                           if (row["minilora"] or {}).get("error", {}).get("where")}))[:120] or "-",
         _examples(m, 8)] for detail, m in differ]) if differ else "None: every test PEFT passes, minilora passes or refuses."
    refused = groups(rows, REFUSED, key=_feature)
    refusals = markdown_table([["feature", "tests", "cases", "minilora's message (one example)"]] + [
        [feature, str(len(m)), ", ".join(sorted({row["case"] for row in m}))[:300],
         m[0]["detail"].split(": ", 1)[-1][:200]] for feature, m in refused]) if refused else "None."
    not_applicable = groups(rows, NA, key=_na_reason)
    na_table = markdown_table([["reason", "tests", "tests (function[case])"]] + [
        [reason, str(len(m)), _examples(m, 4)] for reason, m in not_applicable]) if not_applicable else "None."
    timed_out = f"\n**Timed out:** {', '.join(meta['timed_out'])}; the tests it did not reach are counted.\n" \
        if meta.get("timed_out") else ""
    return f"""# PEFT's own tests, run with PEFT and with minilora.compat

Generated by `{meta['command']}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.
Rebuild it with the same command (`python -m parity peft-tests --help`); the notes block below is kept.

- PEFT's tests: {', '.join(f'`{name}`' for name in meta['files'])} from {meta['tests_from']}, read from the
  checkout at run time.
- Installed: peft {installed['peft']} (the oracle, and the PEFT that minilora.compat stands in for),
  torch {installed['torch']}, transformers {installed['transformers']}; minilora {installed['minilora']}.
- Scope: {_scope(meta)}{
          "; with `--select uses-lora`, also the tests whose code names LoraConfig" if meta.get('select') == 'uses-lora' else ""}.
  In minilora mode, {', '.join(f'`{name}`' for name in meta['replaced']) or '(nothing: that run stopped early)'}
  are minilora.compat's, and minilora's layer counts as PEFT's `LoraLayer` / `BaseTunerLayer` in isinstance checks.
{_stand_ins(meta)}- Time: {meta['seconds']['peft']} s with PEFT, {meta['seconds']['minilora']} s with minilora.
{timed_out}
**{summary_line(meta)}.** *agree*: passes with both; *differ*: passes with PEFT, fails with minilora;
*refused*: passes with PEFT, and minilora raises a `MiniLoraError` naming a feature outside its scope;
*N/A*: PEFT skips (or fails) it.

{NOTES_BEGIN}
{notes.strip()}
{NOTES_END}

## By test function

{markdown_table(by_function(rows, heading=lambda owner: f"**{owner}**")) if rows else "(no tests ran)"}

## By case

{markdown_table(by_case(rows)) if rows else "(no tests ran)"}

## Differences, grouped by error

{differences}

## Refused (out of scope)

{refusals}

## N/A

{na_table}
"""


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    notes = existing_notes(path) if path.exists() else "## Notes\n\n(What the differences mean; kept when the page is regenerated.)"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(rows, meta, notes))

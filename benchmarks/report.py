"""The results as a terminal table, JSON, a markdown page and a PNG plot.

Every ratio is shown with its 95% bootstrap interval (benchmarks/stats.py) and, next to it, the
analytical floor of that row (benchmarks/floor.py). Targets are judged from the intervals only:
"met", "missed", or "not resolved" with how far the interval reaches past the limit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .stats import Target, median_interval, verdict
from .timing import per_round_ratios

# The targets, on the main case (GPT-2 small, r=8, c_attn + c_proj + c_fc), one thread, first
# clock: (label, workload, variant, versus, dropout, target). "No slower than" is "at most 1.01":
# the method resolves +-1%, so a ratio of exactly 1.00 can be told apart from 1.01 but not from 1.00.
NO_SLOWER = Target("no slower", "at most", 1.01)
SAME = Target("equal within 1%", "equal", 0.01)
TARGETS = [
    ("A/A control (base copy vs base), prefill", "prefill", "base-copy", "base", None, SAME),
    ("A/A control (base copy vs base), decode loop", "decode", "base-copy", "base", None, SAME),
    ("A/A control (base copy vs base), generate", "generate", "base-copy", "base", None, SAME),
    ("fused prefill vs base", "prefill", "fused", "base", None, Target("fused prefill", "at most", 1.01)),
    ("fused decode loop vs base", "decode", "fused", "base", None, Target("fused decode", "at most", 1.02)),
    ("fused (concatenate=False) prefill vs base", "prefill", "fused-addmm", "base", None,
     Target("fused prefill", "at most", 1.01)),
    ("fused (concatenate=False) decode loop vs base", "decode", "fused-addmm", "base", None,
     Target("fused decode", "at most", 1.02)),
    ("merged prefill vs base", "prefill", "merged", "base", None, SAME),
    ("merged decode loop vs base", "decode", "merged", "base", None, SAME),
    ("merged generate vs base", "generate", "merged", "base", None, SAME),
    ("reference prefill vs PEFT", "prefill", "reference", "peft", None, NO_SLOWER),
    ("reference decode loop vs PEFT", "decode", "reference", "peft", None, NO_SLOWER),
    ("A/A control (PEFT copy vs PEFT), train, dropout 0", "train", "peft-copy", "peft", 0.0, SAME),
    ("reference train step vs PEFT, dropout 0", "train", "reference", "peft", 0.0, NO_SLOWER),
    ("fused train step vs PEFT, dropout 0", "train", "fused", "peft", 0.0, NO_SLOWER),
    ("A/A control (PEFT copy vs PEFT), train, dropout 0.1", "train", "peft-copy", "peft", 0.1, SAME),
    ("reference train step vs PEFT, dropout 0.1", "train", "reference", "peft", 0.1, NO_SLOWER),
    ("fused train step vs PEFT, dropout 0.1", "train", "fused", "peft", 0.1, NO_SLOWER),
]
MEMORY_LIMIT = 1.01  # train peak memory vs PEFT: "no larger" at the 1% an RSS reading moves by

# One colour per variant, the same in every panel.
COLOURS = {"base-copy": "#7f7f7f", "peft": "#1f77b4", "peft-copy": "#aec7e8", "peft-merged": "#17becf",
           "reference": "#ff7f0e", "merged": "#2ca02c", "fused": "#d62728", "fused-addmm": "#9467bd",
           "compiled": "#8c564b", "peft-mixed": "#bcbd22", "minilora-mixed": "#98df8a", "gathered": "#e377c2"}
SPARE_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def colour(variant: str) -> str:
    if variant in COLOURS:
        return COLOURS[variant]
    return SPARE_COLOURS[sum(map(ord, variant)) % len(SPARE_COLOURS)]


def section_key(m: dict) -> tuple:
    return (m["table"], m["workload"], tuple(m["shape"]), tuple(m["targets"]), m["r"], m["dropout"])


def sections(results: dict) -> dict[tuple, list[dict]]:
    grouped = defaultdict(list)
    for m in results["measurements"]:
        grouped[section_key(m)].append(m)
    return grouped


WORKLOAD_TITLES = {"prefill": "prefill batch {0} x seq {1}", "decode": "decode loop {1} tokens at batch 1 (KV cache)",
                   "generate": "generate() {1} tokens at batch 1", "train": "train step batch {0} x seq {1}"}


def section_title(key: tuple) -> str:
    table, workload, shape, targets, r, dropout = key
    what = WORKLOAD_TITLES.get(workload, workload + " {0} x {1}").format(*shape)
    if table.startswith("mixed"):
        what = what.replace(" at batch 1", f" at batch {shape[0]}")
    return (f"{what} | targets {','.join(targets)} | r={r}"
            + (f" | lora_dropout={dropout}" if dropout is not None else "") + f" | {table}")


def stopping(m: dict) -> str:
    """How the rounds of a section ended: resolved, or the cap and by how much it was not."""
    if m["stopped"] == "resolved":
        return f"{m['rounds']} rounds; every interval within +-{m['half_width'] * 100:.1f}%"
    return (f"{m['rounds']} rounds, stopped by {m['stopped']}: **not resolved to +-1%** "
            f"(widest interval +-{m['half_width'] * 100:.1f}%)")


def interleaving(m: dict) -> str:
    """How the section's rounds were interleaved (older results record neither)."""
    if m.get("lockstep") == "segments":
        segments = f", {m['segments']} per round" if m.get("segments") else ""
        return f" (segment lockstep: every call cut at its blocks and the pieces interleaved{segments})"
    if m.get("lockstep"):
        return " (steps in lockstep across the variants)"
    if m.get("bracketed"):
        return f" (bracketed: {m['ratio_to']} before, between and after the others)"
    return ""


def _diff(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.1e}"


def _interval(c: dict) -> str:
    return f"{c['low']:.3f}-{c['high']:.3f}"


HEADER = ["variant", "{0} ms", "ratio ({0})", "95% interval", "min ratio ({0})", "ratio (wall)", "wall interval",
          "floor MACs", "floor bytes", "max rel diff vs reference"]


def header(measurements: list[dict]) -> list[str]:
    clock = measurements[0]["clock"]
    tokens = [f"tokens/s ({clock})"] if "tokens" in measurements[0] else []
    return [h.format(clock) for h in HEADER[:2]] + tokens + [h.format(clock) for h in HEADER[2:]]


def rows(measurements: list[dict]) -> list[list[str]]:
    """One row per variant: time, ratios with their intervals on both clocks, the floor, validation."""
    out = []
    for m in measurements:
        first, wall = m["clocks"][m["clock"]], m["clocks"]["wall"]
        tokens = [f"{m['tokens'] / first['median_s']:.0f}"] if "tokens" in m else []
        out.append([m["variant"], f"{first['median_s'] * 1000:.1f}"] + tokens + [
            f"{first['ratio']:.3f}", _interval(first), f"{first['min_ratio']:.3f}" if "min_ratio" in first else "-",
            f"{wall['ratio']:.3f}", _interval(wall),
            f"+{m['floor']['macs'] * 100:.2f}%", f"+{m['floor']['bytes'] * 100:.2f}%",
            _diff(m["validation_max_rel_diff"])])
    return out


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in body])


def terminal(results: dict) -> str:
    blocks = []
    for key, ms in sections(results).items():
        blocks.append(f"{section_title(key)}  (ratio to {ms[0]['ratio_to']}; {stopping(ms[0]).replace('**', '')})\n"
                      + text_table(header(ms), rows(ms)))
    if results["memory"]:
        blocks.append("peak memory (MiB beyond what the model holds)\n" + text_table(*memory_table(results)))
    verdicts = targets_check(results)
    if verdicts:
        blocks.append("targets\n" + text_table(TARGETS_HEADER, verdicts))
    for failure in results["failures"]:
        blocks.append(f"FAILED {failure['measurement']} / {failure['variant']}: {failure['error']}")
    return "\n\n".join(blocks)


def pair_ratio(section: list[dict], variant: str, versus: str, clock: str | None = None) -> tuple | None:
    """(median, low, high) of the per-round ratios variant / versus within one section (one clock).

    Each round's ratio is the quotient of the two variants' ratios to the section's reference in that
    round (each to the reference calls around it, when bracketed), so drift cancels here too.
    """
    found = {m["variant"]: m for m in section}
    if variant not in found or versus not in found:
        return None
    clock = clock or found[variant]["clock"]
    ours, theirs = found[variant]["clocks"][clock], found[versus]["clocks"][clock]
    relative = lambda c: per_round_ratios(c["samples_s"], c["paired_s"]) if "paired_s" in c else c["samples_s"]
    return median_interval(per_round_ratios(relative(ours), relative(theirs)))


def main_sections(results: dict) -> dict[str, list[dict]]:
    """The one-thread sections of the main case, by (workload, dropout); prefill at the first shape."""
    plan = results["plan"]
    targets, r = plan["main_case"]
    first_prefill = tuple(plan["prefill_shapes"][0])
    found = {}
    for key, ms in sections(results).items():
        table, workload, shape, case_targets, case_r, dropout = key
        if table == "one thread" and (case_targets, case_r) == (tuple(targets), r) \
                and (workload != "prefill" or shape == first_prefill):
            found[(workload, dropout)] = ms
    return found


TARGETS_HEADER = ["target", "limit", "measured", "95% interval", "verdict", "why"]


def targets_check(results: dict) -> list[list[str]]:
    """The issue's targets on the main case, judged from the intervals (first clock, one thread)."""
    found, out = main_sections(results), []
    for label, workload, variant, versus, dropout, target in TARGETS:
        section = found.get((workload, dropout))
        ratio = pair_ratio(section, variant, versus) if section else None
        if ratio is None:
            continue
        median, low, high = ratio
        decided, why = verdict(target, low, high, rounds=section[0]["rounds"])
        out.append([label, target.describe(), f"{median:.3f}", f"{low:.3f}-{high:.3f}", decided, why])
    for m in results["memory"]:
        if m["workload"] == "train" and m["variant"] != "peft" and m["peak_mib"] is not None:
            peft = next((p for p in results["memory"] if p["workload"] == "train" and p["variant"] == "peft"
                         and p["dropout"] == m["dropout"]), None)
            if peft and peft["peak_mib"]:
                ratio = m["peak_mib"] / peft["peak_mib"]
                out.append([f"{m['variant']} train peak memory vs PEFT, dropout {m['dropout']}",
                            f"<= {MEMORY_LIMIT:.2f}", f"{ratio:.4f}", "one reading",
                            "met" if ratio <= MEMORY_LIMIT else "missed", "one measurement per variant, no interval"])
    return out


METHOD = (
    "Method: each variant is validated against minilora's reference path (float32, relative tolerance {tol:g}) "
    "before it is timed. Rounds time every variant once, in a rotation of table order on even rounds and "
    "that rotation reversed on odd ones; each variant's ratio is taken to the reference variant (base; PEFT for training) of the same "
    "round, on two clocks: **{clock} time** (the process's CPU time on a CPU: time spent waiting for a core "
    "does not count; CUDA events on a GPU) and wall time. Sections marked *segment lockstep* (a CPU, one torch thread, --segment-lockstep; see the note) run so: "
    "each variant's call runs in a thread of its own and a baton passes between the threads at the model's "
    "block boundaries (before every transformer block and the output layer, at every block's input gradient "
    "in the backward, and between steps), so that block k of every variant runs, then block k + 1; every "
    "variant's work lies in the same windows of a few to ~30 ms and a slow burst of the machine hits all "
    "alike. Each segment is timed in its own thread (thread CPU time with one torch thread), and a "
    "variant's round is the sum of its segments. Otherwise (the default), workloads made of steps run "
    "in lockstep (decode: token k of every variant, then token k + 1) and a workload of one call is "
    "bracketed: the reference runs before, between and after the others (R a R b R), each ratio to the "
    "mean of the two reference calls around it. The figure is the median of the per-round ratios "
    "with its 95% bootstrap interval; rounds continue until every interval on the first clock is within "
    "+-{res:.0f}% of its median, or a cap is hit (then the section says so). *min ratio* (the variant's "
    "fastest round over the fastest reference it was compared with) is a secondary figure, robust to "
    "rounds slowed by noise but without an interval: verdicts never use it. The ratio tables run with "
    "{threads} torch thread(s); the all-cores table is separate. The A/A control (an identical copy of the "
    "base model, or of PEFT for training) shows what the method finds for two equal models. The floor "
    "columns are the LoRA branch's extra multiply-adds and elements moved, as % of the base model's "
    "(benchmarks/floor.py; 0 for base and merged weights). A target is met or missed only when its "
    "interval says so, otherwise it is not resolved.")


def markdown(results: dict, title: str = "minilora benchmarks") -> str:
    machine, versions, plan = results["machine"], results["versions"], results["plan"]
    lines = [f"# {title}", ""]
    if results.get("label"):
        lines += [f"**{results['label']}**", ""]
    clock = next((m["clock"] for m in results["measurements"]), "cpu")
    lines += [
        f"Machine: {machine.get('cpu', machine['processor'])}, {machine['cores']} cores, {machine['platform']}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else ", cuda: not available")
        + f"; device `{machine['device']}`. Load average (1, 5, 15 min) at start "
        f"{' '.join(machine.get('load_average_at_start', ['?']))}, at end "
        f"{' '.join(machine.get('load_average_at_end', ['?']))} (above {machine['cores']}: other work shared "
        "the cores during the run).",
        f"Versions: torch {versions['torch']}, transformers {versions['transformers']}, peft {versions['peft']}, "
        f"python {machine['python']}. Model: {plan['model']} (embedded random GPT-2 small when 'gpt2'). "
        f"Run time {results.get('total_s', 0) / 60:.1f} min.", "",
        METHOD.format(tol=results["tolerance_float32"], clock=clock, res=plan["resolution"] * 100,
                      threads=machine["threads"]), ""]
    lines += [f"Note: {note}" for note in plan.get("notes", [])] + [""]
    verdicts = targets_check(results)
    if verdicts:
        targets, r = plan["main_case"]
        lines += [f"## Targets (r={r}, {' + '.join(targets)}, one thread, {clock} time)", "",
                  markdown_table(TARGETS_HEADER, verdicts), ""]
    for table in dict.fromkeys(m["table"] for m in results["measurements"]):
        threads = next(m["threads"] for m in results["measurements"] if m["table"] == table)
        lines += [f"## Timings: {table} ({threads} torch thread{'s' if threads != 1 else ''})", ""]
        for key, ms in sections(results).items():
            if key[0] == table:
                lines += [f"### {section_title(key)}", "", f"Ratio to {ms[0]['ratio_to']}{interleaving(ms[0])}; "
                          f"{stopping(ms[0])}.", "",
                          markdown_table(header(ms), rows(ms)), ""]
    if results["memory"]:
        lines += ["## Peak memory", "", "Each variant in its own process; the peak of one call beyond the "
                  "memory held before it (CPU: RSS high-water mark reset before the call).", "",
                  markdown_table(*memory_table(results)), ""]
    if results["compile_s"]:
        lines += ["## torch.compile", "", markdown_table(["measurement", "first call (compile) s"],
                  [[k, f"{v:.1f}"] for k, v in results["compile_s"].items()]), ""]
    if results.get("layer_call"):
        lines += layer_call_markdown(results["layer_call"])
    if results.get("profile"):
        lines += profile_markdown(results["profile"])
    if results.get("layouts"):
        lines += layouts_markdown(results["layouts"])
    if results.get("skipped"):
        lines += ["## Not measured", ""] + [f"- {f['measurement']} / {f['variant']}: {f['why']}"
                                            for f in results["skipped"]] + [""]
    if results["failures"]:
        lines += ["## Failures", ""] + [f"- {f['measurement']} / {f['variant']}: {f['error']}"
                                        for f in results["failures"]] + [""]
    return "\n".join(lines)


def memory_table(results: dict) -> tuple[list[str], list[list[str]]]:
    body = []
    reference = {(m["workload"], m["dropout"]): m["peak_mib"] for m in results["memory"]
                 if m["variant"] == ("base" if m["workload"] == "prefill" else "peft")}
    for m in results["memory"]:
        ref = reference.get((m["workload"], m["dropout"]))
        ratio = f"{m['peak_mib'] / ref:.3f}" if m["peak_mib"] is not None and ref else "-"
        peak = f"{m['peak_mib']:.1f}" if m["peak_mib"] is not None else m.get("error", "-")
        body.append([f"{m['workload']} {tuple(m['shape'])}" + (f" dropout={m['dropout']}" if m["workload"] == "train" else ""),
                     m["variant"], peak, ratio, m["kind"]])
    return ["workload", "variant", "peak MiB", "ratio to base (PEFT for train)", "measured as"], body




def profile_markdown(profile: dict) -> list[str]:
    lines = [f"## Where the time goes (torch.profiler, prefill {tuple(profile['shape'])}, r={profile['r']}, "
             f"targets {','.join(profile['targets'])})", "",
             "Op self time per prefill call. LoRA matmuls: matmuls with an operand dimension equal to r. "
             "Extra elementwise: the ops a variant calls more often than base (e.g. the reference path's "
             "`* s` and `+` over (N, out) tensors), at their mean time per call. LoRA share: both, over "
             "the rest of the op time.", ""]
    body = []
    for name, data in profile["variants"].items():
        elementwise = ", ".join(f"{row['op'].removeprefix('aten::')} x{row['extra_calls']} {row['extra_ms']:.1f} ms"
                                for row in data["extra_elementwise"]) or "-"
        body.append([name, f"{data['total_ms']:.0f}", f"{data['lora_matmul_calls']}", f"{data['lora_matmul_ms']:.1f}",
                     elementwise, f"{data['lora_share'] * 100:.2f}%", f"{data['extra_calls']:+d}"])
    lines += [markdown_table(["variant", "op time ms", "LoRA matmuls", "their ms", "extra elementwise",
                              "LoRA share", "aten calls vs base"], body), ""]
    return lines


def layer_call_markdown(call: dict) -> list[str]:
    """The per-call overhead table (benchmarks/profile.py, ``layer_call_overhead``)."""
    lines = ["## What one layer call costs beyond its matmuls", "",
             f"One Conv1D of 8 -> 16 (its matmul takes almost nothing) at one token, called {call['calls']} "
             f"times per timed call, {call['rounds']} interleaved rounds, process CPU time, one thread: the bare "
             f"Conv1D takes {call['conv1d_us']:.1f} us per call. The extra is what each way adds per layer call "
             "(Python, the dispatcher, its extra ops), with the 95% interval of the median ratio; GPT-2 small "
             "with r on c_attn, c_proj and c_fc makes 48 such calls per token.", ""]
    body = [[name, f"{v['us']:.1f}", f"{v['extra_us'][0]:+.1f}", f"{v['extra_us'][1]:+.1f} to {v['extra_us'][2]:+.1f}"]
            for name, v in call["variants"].items()]
    return lines + [markdown_table(["variant", "us per call", "extra us", "95% interval"], body), ""]


def layouts_markdown(layouts: list[dict]) -> list[str]:
    """The per-layer layout study (benchmarks/profile.py, ``profile_layouts``)."""
    forms = list(layouts[0]["ratio"])
    lines = ["## The concatenated weight's layout, one layer at a time", "",
             "One Conv1D layer's output with its LoRA update, computed each way for 1 token (decode) and "
             "128 (prefill); median per-round ratio to the layer without LoRA (`base`), 95% interval, "
             "process CPU time, one thread. `rows [W0; A]`: one matmul over the weight stacked as nn.Linear "
             "stores it, (out + r, in) (the fused path before); `cols [W0, A^T]`: stacked in Conv1D's own "
             "layout, (in, out + r); `cols, B^T rows`: that, with B stored as B^T's rows for the rank-r "
             "addmm_ (the fused path now); `addmm`: no concatenation (base matmul, x A^T, addmm_; "
             "concatenate=False). `... matmul only`: the big matmul without the slice and the addmm_.", ""]
    body = [[f"{row['in']} -> {row['out']}", str(row["rows"]), f"{row['us_per_call']['base']:.0f}"]
            + [f"{row['ratio'][f][0]:.3f} ({row['ratio'][f][1]:.3f}-{row['ratio'][f][2]:.3f})" for f in forms[1:]]
            for row in layouts]
    return lines + [markdown_table(["layer", "tokens", "base us"] + forms[1:], body), ""]


def plot(results: dict, path: Path) -> Path | None:
    """Overhead (%) vs base (PEFT for training) per variant, one panel per table and case.

    Bars: the median per-round ratio on the first clock; error bars: its 95% interval; black ticks:
    the analytical floor (extra multiply-adds) of each bar. One colour per variant in every panel.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        return None
    grouped = sections(results)
    panels = list(dict.fromkeys((k[0], k[3], k[4]) for k in grouped))
    if not panels:
        return None
    variants = [v for v in dict.fromkeys(m["variant"] for m in results["measurements"])
                if v not in ("base", "peft") or any(m["variant"] == v and m["ratio_to"] != v
                                                     for m in results["measurements"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.4 * len(panels)), squeeze=False)
    for ax, (table, targets, r) in zip(axes[:, 0], panels):
        keys = [k for k in grouped if (k[0], k[3], k[4]) == (table, targets, r)]
        width = 0.8 / max(max(len(grouped[k]) - 1 for k in keys), 1)
        for j, key in enumerate(keys):
            present = [m for v in variants for m in grouped[key] if m["variant"] == v and v != m["ratio_to"]]
            for i, m in enumerate(present):  # the bars of a group side by side, centred on j
                c = m["clocks"][m["clock"]]
                x, y = j + (i - (len(present) - 1) / 2) * width, (c["ratio"] - 1) * 100
                ax.bar(x, y, width, color=colour(m["variant"]),
                       yerr=[[(c["ratio"] - c["low"]) * 100], [(c["high"] - c["ratio"]) * 100]], capsize=2,
                       error_kw={"linewidth": 0.8})
                ax.hlines(m["floor"]["macs"] * 100, x - width / 2, x + width / 2, color="black", linewidth=1.2)
        labels = [f"{k[1]} {k[2][0]}x{k[2][1]}" + (f"\ndropout {k[5]} (vs PEFT)" if k[5] is not None else "")
                  for k in keys]
        ax.set_xticks(range(len(keys)), labels, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        against = list(dict.fromkeys(m["ratio_to"] for k in keys for m in grouped[k]))  # base, peft, merged
        ax.set_ylabel(f"overhead vs {' / '.join(against)}, %")
        ax.set_title(f"{table}: targets {','.join(targets)}, r={r} (error bars: 95% interval of the median ratio)",
                     fontsize=10)
    handles = [Patch(color=colour(v), label=v) for v in variants]
    handles.append(Line2D([], [], color="black", label="LoRA floor (MACs)"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 7), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.4 * len(panels))))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict, out_dir: Path, stem: str = "latest") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown(results) + "\n")
    if plot(results, paths["png"]) is None:
        del paths["png"]
    return paths


SUMMARY_COLUMNS = ("base-copy", "peft", "reference", "merged", "fused", "fused-addmm", "compiled")
SUMMARY_NAMES = {"base-copy": "A/A control", "fused-addmm": "fused, concatenate=False", "peft-copy": "A/A control"}


def summary_markdown(results: dict) -> str:
    """The README's short form: the main case's ratios with intervals, and the mixed batches."""
    found = main_sections(results)
    cell = lambda c: f"{c['ratio']:.3f} ({c['low']:.3f}-{c['high']:.3f})"
    body = []
    for (workload, dropout), ms in found.items():
        by_variant = {m["variant"]: m for m in ms}
        title = section_title(section_key(ms[0])).split(" | ")[0] + (f", dropout {dropout}" if dropout is not None else "")
        row = [f"{title} (vs {ms[0]['ratio_to']}; {ms[0]['rounds']} rounds)"]
        for variant in SUMMARY_COLUMNS:
            key = "peft-copy" if workload == "train" and variant == "base-copy" else variant
            m = by_variant.get(key)
            row.append(cell(m["clocks"][m["clock"]]) if m and m["variant"] != m["ratio_to"] else "-")
        body.append(row)
    shown = [i for i, _ in enumerate(SUMMARY_COLUMNS) if any(row[i + 1] != "-" for row in body)]  # measured columns
    body = [[row[0]] + [row[i + 1] for i in shown] for row in body]
    lines = [markdown_table([""] + [SUMMARY_NAMES.get(SUMMARY_COLUMNS[i], SUMMARY_COLUMNS[i]) for i in shown], body)]
    mixed = [(key, ms) for key, ms in sections(results).items() if key[0].startswith("mixed")]
    if mixed:
        variants = list(dict.fromkeys(m["variant"] for _, ms in mixed for m in ms))
        rows_ = []
        for key, ms in mixed:
            by_variant = {m["variant"]: m for m in ms}
            row = [f"{key[0].removeprefix('mixed batch, ')}, {key[1]} {key[2][0]} x {key[2][1]}"]
            for variant in variants:
                m = by_variant.get(variant)
                row.append("-" if m is None else f"{m['tokens'] / m['clocks'][m['clock']]['median_s']:.0f} tok/s"
                           + ("" if variant == m["ratio_to"] else f", {m['clocks'][m['clock']]['ratio']:.2f}x"))
            rows_.append(row)
        lines += ["", markdown_table(["mixed batch"] + variants, rows_)]
    return "\n".join(lines)


def readme_block(results: dict, page: str) -> str:
    """What the README shows of a run: when and how quiet, the summary table, and the targets' verdicts."""
    machine = results["machine"]
    load = lambda key: " ".join(machine.get(key, ["?"]))
    rounds = sorted({m["rounds"] for ms in main_sections(results).values() for m in ms})
    lines = [f"[{page}]({page}): {results.get('total_s', 0) / 60:.1f} min, load average (1, 5, 15 min) "
             f"{load('load_average_at_start')} at the start, {load('load_average_at_end')} at the end; "
             f"{rounds[0]}{'' if rounds[0] == rounds[-1] else f'-{rounds[-1]}'} rounds per section. Median per-round ratio on CPU time (95% interval):", "",
             summary_markdown(results), ""]
    verdicts = targets_check(results)
    by_verdict = {decided: [row for row in verdicts if row[4] == decided] for decided in ("met", "missed", "not resolved")}
    for decided, found in by_verdict.items():
        if found:
            lines.append(f"- **{decided}**: " + "; ".join(f"{row[0]} {row[2]} ({row[3]}, limit {row[1]})" for row in found))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    loaded = json.loads(Path(sys.argv[1]).read_text())
    page = sys.argv[1].removesuffix(".json") + ".md"  # the README links the page
    print(readme_block(loaded, page) if "--readme" in sys.argv else summary_markdown(loaded))

"""The results as a terminal table, JSON, a markdown page and a PNG plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .plan import ALL_LINEAR

# The targets (GPT-2 small, r=8, all three targets): the highest acceptable ratio.
TARGETS = {
    "unmerged prefill (best minilora unmerged path) vs base": 1.02,
    "fused decode vs base": 1.03,
    "merged vs base (prefill and decode)": 1.01,
    "training step vs PEFT (dropout 0 and 0.1)": 1.00,
}


def section_key(m: dict) -> tuple:
    return (m["workload"], tuple(m["shape"]), tuple(m["targets"]), m["r"], m["dropout"])


def sections(results: dict) -> dict[tuple, list[dict]]:
    grouped = defaultdict(list)
    for m in results["measurements"]:
        grouped[section_key(m)].append(m)
    return grouped


def section_title(key: tuple) -> str:
    workload, shape, targets, r, dropout = key
    what = f"{workload} batch {shape[0]} x seq {shape[1]}" if workload != "decode" else \
        f"decode {shape[1]} tokens at batch 1"
    return f"{what} | targets {','.join(targets)} | r={r}" + (f" | lora_dropout={dropout}" if dropout is not None else "")


def _diff(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.1e}"


def rows(measurements: list[dict]) -> list[list[str]]:
    out = []
    for m in measurements:
        out.append([m["variant"], f"{m['median_s'] * 1000:.1f}", f"{m['ratio']:.3f}",
                    f"{(m['ratio'] - 1) * 100:+.1f}%", f"{m['ratio_iqr'] * 100:.1f}%", str(m["rounds"]),
                    _diff(m["validation_max_rel_diff"])])
    return out


HEADER = ["variant", "median ms", "ratio", "overhead", "noise (IQR)", "rounds", "max rel diff vs reference"]


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
        floor = ms[0]["flop_floor"]
        blocks.append(f"{section_title(key)}  (ratio to {ms[0]['ratio_to']}; LoRA FLOP floor +{floor * 100:.2f}%)\n"
                      + text_table(HEADER, rows(ms)))
    if results["memory"]:
        blocks.append("peak memory (MiB beyond what the model holds)\n" + text_table(*memory_table(results)))
    verdicts = targets_check(results)
    if verdicts:
        blocks.append("targets\n" + text_table(["target", "limit", "measured", "met"], verdicts))
    for failure in results["failures"]:
        blocks.append(f"FAILED {failure['measurement']} / {failure['variant']}: {failure['error']}")
    return "\n\n".join(blocks)


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


def _find(results: dict, workload: str, variant: str, dropout=None, shape=None) -> dict | None:
    targets, r = results["plan"]["main_case"]
    for m in results["measurements"]:
        if (m["workload"], m["variant"], m["r"], tuple(m["targets"])) == (workload, variant, r, tuple(targets)) \
                and m["dropout"] == dropout and (shape is None or tuple(m["shape"]) == tuple(shape)):
            return m
    return None


def targets_check(results: dict) -> list[list[str]]:
    """The issue's targets, on the main case (largest prefill shape), with the noise of each ratio."""
    plan = results["plan"]
    if tuple(plan["main_case"][0]) != ALL_LINEAR:
        return []
    largest = max((tuple(s) for s in plan["prefill_shapes"]), key=lambda s: s[0] * s[1])
    fmt = lambda m: f"{m['ratio']:.3f} ±{m['ratio_iqr']:.3f} ({m['variant']})"
    verdict = lambda m, limit: "yes" if m["ratio"] <= limit else (
        "within noise" if m["ratio"] - m["ratio_iqr"] <= limit else "no")
    out = []
    unmerged = [m for v in ("reference", "fused", "fused-addmm") if (m := _find(results, "prefill", v, shape=largest))]
    if unmerged:
        best = min(unmerged, key=lambda m: m["ratio"])
        limit = TARGETS["unmerged prefill (best minilora unmerged path) vs base"]
        out.append([f"unmerged prefill {largest} vs base", f"{limit:.2f}", fmt(best), verdict(best, limit)])
        if peft := _find(results, "prefill", "peft", shape=largest):
            out.append([f"  (PEFT unmerged prefill {largest}, for comparison)", "-", fmt(peft), "-"])
    for variant in ("fused", "fused-addmm"):
        if fused := _find(results, "decode", variant):
            out.append(["fused decode vs base", "1.03", fmt(fused), verdict(fused, 1.03)])
    if peft := _find(results, "decode", "peft"):
        out.append(["  (PEFT unmerged decode, for comparison)", "-", fmt(peft), "-"])
    for workload, shape in (("prefill", largest), ("decode", None)):
        if merged := _find(results, workload, "merged", shape=shape):
            out.append([f"merged {workload} vs base", "1.01", fmt(merged), verdict(merged, 1.01)])
    for dropout in plan["dropouts"]:
        for variant in ("fused", "reference"):
            if m := _find(results, "train", variant, dropout=dropout):
                out.append([f"train dropout={dropout} vs PEFT", "1.00", fmt(m), verdict(m, 1.00)])
    for m in results["memory"]:
        if m["workload"] == "train" and m["variant"] != "peft" and m["peak_mib"] is not None:
            peft = next((p for p in results["memory"] if p["workload"] == "train" and p["variant"] == "peft"
                         and p["dropout"] == m["dropout"]), None)
            if peft and peft["peak_mib"]:
                ratio = m["peak_mib"] / peft["peak_mib"]
                met = "yes" if ratio <= 1.0 else "within noise (0.5%)" if ratio <= 1.005 else "no"
                out.append([f"train memory dropout={m['dropout']} vs PEFT", "1.00", f"{ratio:.4f} ({m['variant']})", met])
    return out


def markdown(results: dict, title: str = "minilora benchmarks") -> str:
    machine, versions = results["machine"], results["versions"]
    lines = [f"# {title}", ""]
    if results.get("label"):
        lines += [f"**{results['label']}**", ""]
    lines += [
        f"Machine: {machine.get('cpu', machine['processor'])}, {machine['cores']} cores, torch threads "
        f"{machine['threads']}, {machine['platform']}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else ", cuda: not available")
        + f"; device `{machine['device']}`; "
        f"load average (1, 5, 15 min) at start {' '.join(machine.get('load_average_at_start', ['?']))}, "
        f"at end {' '.join(machine.get('load_average_at_end', ['?']))} (above {machine['cores']}: "
        "the cores were shared during the run).",
        f"Versions: torch {versions['torch']}, transformers {versions['transformers']}, peft {versions['peft']}, "
        f"python {machine['python']}. Model: {results['plan']['model']} (embedded random GPT-2 small when 'gpt2').",
        f"Run time {results.get('total_s', 0) / 60:.1f} min. Every variant was validated against minilora's "
        f"reference path (float32, relative tolerance {results['tolerance_float32']:g}) before it was timed.",
        "Ratios: per-round ratio to base (to PEFT for training), median over interleaved rounds; "
        "noise = interquartile range of those ratios. The FLOP floor is the LoRA branches' extra "
        "multiply-adds over the base model's.", ""]
    lines += [f"Note: {note}" for note in results["plan"].get("notes", [])] + [""]
    verdicts = targets_check(results)
    if verdicts:
        lines += ["## Targets (GPT-2 small, r=8, c_attn + c_proj + c_fc)", "",
                  markdown_table(["target", "limit", "measured ratio ± noise", "met"], verdicts), ""]
    lines += ["## Timings", ""]
    for key, ms in sections(results).items():
        lines += [f"### {section_title(key)}", "",
                  f"Ratio to {ms[0]['ratio_to']}; LoRA FLOP floor +{ms[0]['flop_floor'] * 100:.2f}%.", "",
                  markdown_table(HEADER, rows(ms)), ""]
    if results["memory"]:
        lines += ["## Peak memory", "", "Each variant in its own process; the peak of one call beyond the "
                  "memory held before it (CPU: RSS high-water mark reset before the call).", "",
                  markdown_table(*memory_table(results)), ""]
    if results["compile_s"]:
        lines += ["## torch.compile", "", markdown_table(["measurement", "first call (compile) s"],
                  [[k, f"{v:.1f}"] for k, v in results["compile_s"].items()]), ""]
    if results.get("profile"):
        lines += profile_markdown(results["profile"])
    if results["failures"]:
        lines += ["## Failures", ""] + [f"- {f['measurement']} / {f['variant']}: {f['error']}"
                                        for f in results["failures"]] + [""]
    return "\n".join(lines)


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


def plot(results: dict, path: Path) -> Path | None:
    """Overhead (%) vs base (PEFT for training) per variant, one panel per case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = sorted({(tuple(m["targets"]), m["r"]) for m in results["measurements"]}, key=lambda c: (len(c[0]), c[1]))
    if not cases:
        return None
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.2 * len(cases)), squeeze=False)
    for ax, (targets, r) in zip(axes[:, 0], cases):
        keys = [k for k in sections(results) if (k[2], k[3]) == (targets, r)]
        variants = [v for v in dict.fromkeys(m["variant"] for m in results["measurements"])
                    if v not in ("base",)]
        width = 0.8 / max(len(variants), 1)
        for i, variant in enumerate(variants):
            xs, ys, errs = [], [], []
            for j, key in enumerate(keys):
                m = next((m for m in sections(results)[key] if m["variant"] == variant), None)
                if m and m["variant"] != m["ratio_to"]:
                    xs.append(j + i * width)
                    ys.append((m["ratio"] - 1) * 100)
                    errs.append(m["ratio_iqr"] * 50)
            ax.bar(xs, ys, width, yerr=errs, label=variant, capsize=2)
        labels = [(f"{k[0]} {k[1][0]}x{k[1][1]}" if k[0] != "decode" else f"decode {k[1][1]} tok")
                  + (f"\ndropout {k[4]}\n(vs PEFT)" if k[4] is not None else "") for k in keys]
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(keys))], labels, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        floor = next((m["flop_floor"] for m in results["measurements"] if (tuple(m["targets"]), m["r"]) == (targets, r)), 0)
        ax.axhline(floor * 100, color="grey", linestyle=":", linewidth=0.8, label="FLOP floor")
        ax.set_ylabel("overhead vs base, %")
        ax.set_title(f"targets {','.join(targets)}, r={r}", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
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

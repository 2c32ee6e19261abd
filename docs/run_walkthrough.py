"""Run the walkthrough's code and check (or rewrite) the output it shows.

    python docs/run_walkthrough.py            # run every ```python block; exit 1 if an output differs
    python docs/run_walkthrough.py --update   # run them and write the real outputs into the page

The ```python blocks of docs/walkthrough.md run in order, in one namespace, inside a fresh
temporary directory (files they write vanish afterwards). What a block prints goes in the ```text
block right after it; a block that prints nothing has none. The test suite runs the check, so the
page cannot drift away from what the code really does.

The page shows CPU outputs (training on a GPU rounds differently), so the runner hides any GPU
from the blocks: the check gives the same answer on every machine. It also runs them with one torch
thread: the page compares GPT-2 small outputs bitwise (``torch.equal``), and multithreaded MKL does
not promise the same summation order from run to run (measured: 34 s with one thread, about 40 s
with two before).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

PAGE = Path(__file__).with_name("walkthrough.md")
FENCE = re.compile(r"^```(\w*)\s*$")


class Block(NamedTuple):
    """A fenced block: its language, its text, and its lines [start, end) in the page (fences included)."""

    language: str
    text: str
    start: int
    end: int


def fenced_blocks(lines: list[str]) -> list[Block]:
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"walkthrough line {i + 1}: a ``` block is never closed")
        blocks.append(Block(opening.group(1), "\n".join(lines[i + 1:j]), i, j + 1))
        i = j + 1
    return blocks


def code_and_outputs(lines: list[str]) -> list[tuple[Block, Block | None]]:
    """Each python block with the text block that follows it (only blank lines between), or None."""
    blocks = fenced_blocks(lines)
    pairs = []
    for k, block in enumerate(blocks):
        if block.language != "python":
            continue
        following = blocks[k + 1] if k + 1 < len(blocks) else None
        if following is not None and following.language == "text" \
                and all(not line.strip() for line in lines[block.end:following.start]):
            pairs.append((block, following))
        else:
            pairs.append((block, None))
    return pairs


def run_blocks(codes: list[str], page: str = "walkthrough.md", timings: list[float] | None = None) -> list[str]:
    """Execute the code blocks in order in one namespace, in a temporary directory; their stdouts.

    ``timings``, if given, receives each block's wall-clock seconds (never printed into the page).
    """
    namespace: dict = {"__name__": "__walkthrough__"}
    outputs = []
    previous_dir = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="walkthrough-") as scratch:
        os.chdir(scratch)
        try:
            for number, code in enumerate(codes, start=1):
                captured = io.StringIO()
                started = time.perf_counter()
                with contextlib.redirect_stdout(captured):
                    exec(compile(code, f"<{page}, python block {number}>", "exec"), namespace)
                if timings is not None:
                    timings.append(time.perf_counter() - started)
                outputs.append("\n".join(line.rstrip() for line in captured.getvalue().rstrip().splitlines()))
        finally:
            os.chdir(previous_dir)
    return outputs


def render(lines: list[str], outputs: list[str]) -> list[str]:
    """The page with each python block's text block replaced by (or set to) its real output."""
    pairs = code_and_outputs(lines)
    new_lines, cursor = [], 0
    for (code, shown), output in zip(pairs, outputs):
        new_lines.extend(lines[cursor:code.end])
        cursor = shown.end if shown is not None else code.end
        if output:
            new_lines.extend(["", "```text", *output.split("\n"), "```"])
        if shown is None and output and cursor < len(lines) and lines[cursor].strip():
            new_lines.append("")
    new_lines.extend(lines[cursor:])
    return new_lines


def check(page: Path = PAGE, timings: list[float] | None = None) -> tuple[str, str]:
    """(the page as it is, the page as the code's real outputs would write it)."""
    text = page.read_text()
    lines = text.split("\n")
    outputs = run_blocks([code.text for code, _ in code_and_outputs(lines)], page.name, timings)
    return text, "\n".join(render(lines, outputs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="write the real outputs into the page")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the page (default: {PAGE})")
    parser.add_argument("--timings", action="store_true", help="print each block's seconds to stderr")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the page never needs the hub
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU outputs everywhere (set before the blocks import torch)
    import torch

    torch.set_num_threads(1)  # a fixed summation order: the page's torch.equal lines cannot flip run to run
    timings: list[float] = []
    before, after = check(args.page, timings)
    if args.timings:
        for number, seconds in enumerate(timings, start=1):
            print(f"block {number:2d}: {seconds:6.1f} s", file=sys.stderr)
        print(f"total:    {sum(timings):6.1f} s", file=sys.stderr)
    if before == after:
        print(f"{args.page}: every output matches the code")
        return 0
    if args.update:
        args.page.write_text(after)
        print(f"{args.page}: outputs updated")
        return 0
    sys.stdout.writelines(difflib.unified_diff(
        before.splitlines(True), after.splitlines(True), "page", "real output"))
    print(f"\n{args.page}: outputs differ; if the new ones are right, run python docs/run_walkthrough.py --update")
    return 1


if __name__ == "__main__":
    sys.exit(main())

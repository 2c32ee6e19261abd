"""Run the checks over the grid, on each device, and collect the rows.

The order per case: targets, counts and init on the fresh same-seed twins; then equal random adapters
for forward, backward and files; then training (which moves both adapters); generate on equal
adapters again; and merge last (it unloads the LoRA layers). A case whose twins cannot be built (a
refusal) gives one targets row that compares the refusal with PEFT's answer. Behaviours run once per small model kind (tiny GPT-2, nn.Linear), on its first case.

A check that raises inside PEFT (an old release without some API) becomes an N/A row that says
why; one that raises anywhere else is a FAIL. A device that is not present gives one SKIP row,
"cuda: not available": never a silent skip.
"""

from __future__ import annotations

import gc
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from parity import adapters, behaviours, checks, grid, twins
from parity.results import CHECKS, FAIL, KNOWN_DEVICES, Result, not_applicable, skipped



def device_available(device: str) -> bool:
    if device == "cpu":
        return True
    if device == "cuda":
        return torch.cuda.is_available()
    return False


def resolve_devices(choice: str) -> list[str]:
    """"all" -> every known device (absent ones are reported, not dropped); else the one named."""
    return list(KNOWN_DEVICES) if choice == "all" else [choice]


def _raised_in_peft(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/peft/" in frames[-1].filename.replace("\\", "/")


def guarded(name: str, case: grid.Case, device: str, run: Callable[[], list[Result]]) -> list[Result]:
    """Run one check; an exception becomes a row instead of ending the suite."""
    try:
        return run()
    except twins.UnsupportedByPeft as error:
        return [not_applicable(name, case.label, device, str(error))]
    except Exception as error:  # noqa: BLE001 - reported as a row, with where it came from
        import peft

        text = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        if _raised_in_peft(error):
            return [not_applicable(name, case.label, device, f"PEFT {peft.__version__} cannot run this: {text}")]
        return [Result(name, case.label, device, "-", None, None, FAIL, f"raised {text}")]


def run_case(bases: grid.Bases, case: grid.Case, device: str, selected: tuple[str, ...], directory: Path,
             with_behaviours: bool, training_steps: int) -> list[Result]:
    """Every selected check on one case, in the order the docstring above explains."""
    rows: list[Result] = []
    try:
        pair = grid.make_pair(bases, case, device)
    except twins.UnsupportedByPeft as error:
        return [not_applicable(name, case.label, device, str(error)) for name in selected]
    except Exception as error:  # noqa: BLE001 - a refusal: compared with PEFT's answer in a "targets" row
        rows = checks.check_refusal(bases.get(case.model, case.dtype, device), case, device, error)
        return rows + [not_applicable(name, case.label, device, "no adapter to compare (see targets)")
                       for name in selected if name != "targets" and (name != "behaviours" or with_behaviours)]

    def step(name: str, run: Callable[[], list[Result]]) -> None:
        if name in selected:
            rows.extend(guarded(name, case, device, run))

    step("targets", lambda: checks.check_targets(pair))
    step("counts", lambda: checks.check_counts(pair))
    step("init", lambda: checks.check_init(pair))
    grid.randomize(pair)
    step("forward", lambda: checks.check_forward(pair))
    step("backward", lambda: checks.check_backward(pair))
    step("files", lambda: behaviours.check_files(pair, directory / "files"))
    if with_behaviours:
        step("behaviours", lambda: behaviours.check_behaviours(pair, directory / "behaviours"))
        step("adapters", lambda: adapters.check_adapters(pair, directory / "adapters"))  # on copies of the pair
    step("training", lambda: checks.check_training(pair, steps=training_steps))
    grid.randomize(pair)  # equal adapters again, whatever training did
    step("generate", lambda: checks.check_generate(pair))
    step("merge", lambda: checks.check_merge(pair))
    return rows


def run_suite(cases: list[grid.Case], devices: list[str], model_name: Optional[str] = None,
              selected: Optional[tuple[str, ...]] = None, training_steps: int = 3,
              progress: Callable[[str], None] = lambda line: None) -> list[Result]:
    """All rows for ``cases`` x ``devices``. ``progress`` gets one line per case as it starts."""
    selected = tuple(selected or CHECKS)
    rows: list[Result] = []
    # cases sharing a base model run together, so each base is built once and freed when done
    ordered = sorted(cases, key=lambda c: (c.model != "gpt2", c.model, c.dtype != "float32", c.dtype))
    for device in devices:
        if not device_available(device):
            rows.append(skipped("device", "-", device, f"{device}: not available"))
            progress(f"{device}: not available")
            continue
        bases = grid.Bases(model_name)
        seen_models: set[str] = set()
        with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
            for number, case in enumerate(ordered, 1):
                start = time.perf_counter()
                progress(f"[{number}/{len(ordered)}] {device} {case.label}")
                # behaviours once per model kind, on the small models (they deep-copy and pickle the base)
                with_behaviours = case.model not in seen_models and case.model in ("linear", "tiny-gpt2")
                seen_models.add(case.model)
                case_dir = Path(tmp) / f"case-{number}"
                rows.extend(run_case(bases, case, device, selected, case_dir, with_behaviours, training_steps))
                bases.release_unneeded(upcoming=ordered[number:])
                gc.collect()
                progress(f"      done in {time.perf_counter() - start:.1f}s")
    return rows

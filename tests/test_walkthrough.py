"""docs/walkthrough.md cannot go stale: its code runs here and must print exactly what the page shows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER_PATH = Path(__file__).resolve().parents[1] / "docs" / "run_walkthrough.py"


def load_runner():
    spec = importlib.util.spec_from_file_location("run_walkthrough", RUNNER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = load_runner()

PAGE = """\
# A page

```python
print("one")
print("two")
```

```text
stale
```

```python
x = 3
```

```python
print(x * 2)
```
The end.
"""


def test_runner_pairs_each_code_block_with_its_output_block():
    lines = PAGE.split("\n")
    pairs = runner.code_and_outputs(lines)
    assert [code.text for code, _ in pairs] == ['print("one")\nprint("two")', "x = 3", "print(x * 2)"]
    assert [shown.text if shown else None for _, shown in pairs] == ["stale", None, None]


def test_runner_executes_in_order_and_renders_real_outputs(tmp_path):
    lines = PAGE.split("\n")
    outputs = runner.run_blocks([code.text for code, _ in runner.code_and_outputs(lines)])
    assert outputs == ["one\ntwo", "", "6"]  # one namespace: block 3 sees block 2's x
    rendered = runner.render(lines, outputs)
    assert "stale" not in rendered
    assert runner.code_and_outputs(rendered)[0][1].text == "one\ntwo"
    assert runner.code_and_outputs(rendered)[2][1].text == "6"
    assert rendered[-2:] == ["The end.", ""]
    assert runner.render(rendered, outputs) == rendered  # a fixed point: a second update changes nothing


def test_runner_reports_the_failing_block():
    with pytest.raises(ZeroDivisionError) as error:
        runner.run_blocks(["x = 1", "1 / 0"], page="page.md")
    assert "python block 2" in "".join(str(entry.path) for entry in error.traceback)


@pytest.mark.slow
def test_walkthrough_prints_what_the_page_shows():
    """Runs every block of docs/walkthrough.md: GPT-2 small on CPU, one torch thread, about 35 s.

    In a fresh process: the page sets seeds, trains and holds a few GPT-2s (about 2 GB), none of
    which should leak into the other tests; the runner hides GPUs so the outputs are CPU outputs.
    """
    result = subprocess.run([sys.executable, str(RUNNER_PATH)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, (
        f"docs/walkthrough.md is stale or a block failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
    assert "every output matches the code" in result.stdout

"""A pytest plugin that runs PEFT's own tests with PEFT or with ``minilora.compat`` (``python -m parity peft-tests``).

``parity.peft_suite`` starts pytest twice in a subprocess, with ``-p parity.peft_plugin`` and these
environment variables:

    PARITY_PEFT_MODE   "peft" (PEFT as installed: the oracle) or "minilora" (PEFT's LoRA entry points
                       replaced by minilora.compat's before the tests are imported)
    PARITY_PEFT_SCOPE  "linear-conv1d" (default: LoRA cases on models built of nn.Linear and transformers'
                       Conv1D) or "all-lora" (every case parametrized with LoraConfig)
    PARITY_PEFT_SELECT "cases" (default: tests parametrized with LoraConfig) or "uses-lora" (also tests
                       parametrized with no PEFT config whose code names LoraConfig: PEFT's other test files)
    PARITY_PEFT_CASES  optional: only these cases (PEFT's ``test_name`` parameter), separated by "|"
    PARITY_PEFT_NETWORK "1" lets the tests reach other machines (by default every connection fails at once)
    PARITY_PEFT_OFFLINE_MODELS "0" loads the hub ids of PEFT's model tests as they are (from the local Hugging
                       Face cache); by default the ids in parity.peft_offline_models.STAND_INS load tiny random
                       stand-ins built here, in both modes
    PARITY_PEFT_OUT    a file that receives one JSON line per test as it finishes (and one for the number of
                       tests selected, one per file that cannot be collected), so the runner can show
                       progress and survive a crash

Nothing here is PEFT's code: the tests are read from the user's PEFT checkout at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

MODE = os.environ.get("PARITY_PEFT_MODE", "peft")
SCOPE = os.environ.get("PARITY_PEFT_SCOPE", "linear-conv1d")
CASES = [case for case in os.environ.get("PARITY_PEFT_CASES", "").split("|") if case]
SELECT = os.environ.get("PARITY_PEFT_SELECT", "cases")
OUT = os.environ.get("PARITY_PEFT_OUT")

# PEFT's custom test models (tests/test_custom_models.py, MockTransformerWrapper.from_pretrained), by
# what their LoRA targets are built of. minilora wraps nn.Linear and transformers' Conv1D; EmbConv1D
# also has an Embedding, so its "emb" cases are refusals inside the default scope.
LINEAR_CONV1D_MODELS = {"MLP", "MLP2", "MLP_LayerNorm", "EmbConv1D"}
OTHER_MODELS = {"Conv1d", "Conv1dBigger", "Conv1dGroups", "Conv1dKernel1", "Conv2d", "Conv2d1x1", "Conv2d2",
                "Conv2dGroups", "Conv2dGroups2", "Conv3d", "MHA", "MlpUsingParameters"}

# PEFT's test helpers import these at module level for tests that LoRA cases never reach; where they
# are not installed, an empty module lets the test files import (in this subprocess only).
OPTIONAL_IMPORTS = {"diffusers": ["StableDiffusionPipeline"], "datasets": ["load_dataset"]}


def _stub_missing_optional_imports() -> None:
    # transformers.trainer (which minilora.compat imports: compat_trainer.py) asks importlib whether
    # datasets is installed, and importlib raises for a module without an import spec, as a stub is:
    # let it ask (once, cached) before the stubs exist.
    if importlib.util.find_spec("transformers") is not None:
        importlib.import_module("transformers.trainer")
    for name, attributes in OPTIONAL_IMPORTS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__version__ = "0.0.0"  # some tests compare versions at import
            for attribute in attributes:  # a class nothing is an instance of (PEFT's tests ask isinstance), or None
                setattr(stub, attribute, type(attribute, (), {"__module__": name}) if attribute[0].isupper() else None)
            sys.modules[name] = stub


def _use_minilora() -> list[str]:
    """Put minilora.compat's API where PEFT's tests import it from; the names replaced.

    Every name minilora.compat exports (get_peft_model, PeftModel, LoraConfig, the state-dict functions,
    ...) replaces PEFT's in the modules the tests import from: ``peft``, ``peft.utils``,
    ``peft.utils.other`` (ModulesToSaveWrapper) and ``peft.tuners.lora``, wherever PEFT has that name.
    PEFT's own modules keep what they bound at import.
    """
    import peft
    import peft.tuners.lora as peft_lora
    import peft.utils as peft_utils
    import peft.utils.other as peft_utils_other
    from peft.tuners.tuners_utils import BaseTunerLayer

    import minilora.compat as compat
    from minilora.layer import LoraLinear

    replaced = []
    for module in (peft, peft_utils, peft_utils_other, peft_lora):
        for name in compat.__all__:
            if hasattr(module, name) and name != "TaskType":  # constants: PEFT's str enum serves both
                setattr(module, name, getattr(compat, name))
                replaced.append(f"{module.__name__}.{name}")
    # PEFT's tests register a default for a new model type by monkeypatching PEFT's own table; minilora
    # keeps an equal copy (tests/test_targets.py compares them key by key), so it reads PEFT's object here.
    from peft.tuners.lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    import minilora.targets

    minilora.targets.DEFAULT_TARGET_MODULES = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    replaced.append("minilora.targets.DEFAULT_TARGET_MODULES (PEFT's table object)")
    # isinstance(module, LoraLayer / BaseTunerLayer) in PEFT's tests finds minilora's layers (both are ABCs)
    peft_lora.LoraLayer.register(LoraLinear)
    if not issubclass(LoraLinear, BaseTunerLayer):
        BaseTunerLayer.register(LoraLinear)
    return replaced


def _no_network() -> None:
    """Connections to other machines fail at once. The runs are offline (HF_HUB_OFFLINE=1), but PEFT's
    ``hub_online_once`` turns the hub back on for a model's first use, and without a network each such
    test would wait for timeouts (about 45 s). Models in the local Hugging Face cache still load."""
    import socket

    connect = socket.socket.connect

    def refuse_remote(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"parity.peft_plugin: no network in these runs (connect to {address[0]!r})")
        connect(sock, address)

    socket.socket.connect = refuse_remote
    socket.getaddrinfo = _refuse_lookup(socket.getaddrinfo)
    # huggingface_hub retries a failed request 5 times, sleeping 1, 2, 4, 8, 8 s: its retries need no wait here
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return
    if isinstance(getattr(_http, "time", None), types.ModuleType):
        _http.time = _TimeWithoutSleep(_http.time)


class _TimeWithoutSleep(types.ModuleType):
    """The ``time`` module, but ``sleep`` returns at once."""

    def __init__(self, time_module: types.ModuleType):
        super().__init__("time")
        self._time = time_module

    def __getattr__(self, name: str):
        return getattr(self._time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def _refuse_lookup(getaddrinfo):
    def lookup(host, *args, **kwargs):
        if host not in (None, "127.0.0.1", "::1", "localhost"):
            raise OSError(f"parity.peft_plugin: no network in these runs (look-up of {host!r})")
        return getaddrinfo(host, *args, **kwargs)
    return lookup


# Only in the pytest subprocess that peft_suite starts (it sets PARITY_PEFT_MODE): importing this
# module anywhere else (the tests do) must not stub modules, cut the network or swap names there.
RUNNING = "PARITY_PEFT_MODE" in os.environ
if RUNNING:
    _stub_missing_optional_imports()
    if os.environ.get("PARITY_PEFT_NETWORK") != "1":
        _no_network()
REPLACED = _use_minilora() if RUNNING and MODE == "minilora" else []
OFFLINE_MODELS = RUNNING and os.environ.get("PARITY_PEFT_OFFLINE_MODELS", "1") != "0"
if OFFLINE_MODELS:  # in both modes, before PEFT's tests import transformers' classes
    from parity import peft_offline_models

    peft_offline_models.install()


# ------------------------------------------------------------------------------------------------
# choosing the LoRA cases
# ------------------------------------------------------------------------------------------------
def _is_lora_config(value: object) -> bool:
    return (isinstance(value, type) and value.__name__ == "LoraConfig") or type(value).__name__ == "LoraConfig"


def _is_config(value: object) -> bool:
    cls = value if isinstance(value, type) else type(value)
    return cls.__name__.endswith("Config") and cls.__module__.startswith(("peft", "minilora"))


def _names_lora_config(function: object) -> bool:
    try:
        return re.search(r"\bLoraConfig\b", inspect.getsource(function)) is not None
    except (OSError, TypeError):
        return False


def in_scope(params: dict, scope: str = SCOPE, cases: list[str] = CASES, select: str = SELECT,
             function: object = None) -> bool:
    """A LoRA case: one of its parameters is LoraConfig (the class or an instance). With select
    "uses-lora", also a test parametrized with no PEFT config whose code names LoraConfig."""
    if not any(_is_lora_config(value) for value in params.values()):
        return (select == "uses-lora" and not cases and not any(_is_config(value) for value in params.values())
                and _names_lora_config(function))
    if cases and params.get("test_name") not in cases:
        return False
    model_id = params.get("model_id")
    return scope == "all-lora" or not (isinstance(model_id, str) and model_id in OTHER_MODELS)


def _params(item: pytest.Item) -> dict:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


def _describe(params: dict) -> dict:
    """The parameters that name a case, as JSON text."""
    return {key: params[key] for key in ("test_name", "model_id") if isinstance(params.get(key), str)}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = [item for item in items if in_scope(_params(item), function=getattr(item, "function", None))]
    chosen = set(selected)
    deselected = [item for item in items if item not in chosen]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
    _write({"selected": len(selected), "mode": MODE, "replaced": REPLACED})


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A test file that cannot be imported (or collected) is recorded, with the last line of its error."""
    if report.failed:
        lines = str(report.longrepr).strip().splitlines()
        _write({"collect_error": report.nodeid, "message": (lines[-1] if lines else "")[:600]})


# ------------------------------------------------------------------------------------------------
# recording outcomes
# ------------------------------------------------------------------------------------------------
_outcomes: dict[str, dict] = {}


def _chain(error: BaseException) -> list[BaseException]:
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _minilora_refusal(error: BaseException) -> BaseException | None:
    """The MiniLoraError (minilora refused, with a message) that raised or caused ``error``, if any."""
    return next((link for link in _chain(error) if any(
        cls.__name__ == "MiniLoraError" and cls.__module__.startswith("minilora") for cls in type(link).__mro__)),
        None)


def _where(excinfo: pytest.ExceptionInfo, tests_dir: Path) -> str:
    """The last line of PEFT's test code in the traceback (file:line), where the test stopped."""
    for entry in reversed(excinfo.traceback):
        path = Path(str(entry.path))
        if tests_dir in path.parents:
            return f"{path.name}:{entry.lineno + 1}"
    return ""


def _error(excinfo: pytest.ExceptionInfo, tests_dir: Path) -> dict:
    refusal = _minilora_refusal(excinfo.value)
    shown = excinfo.value if refusal is None else refusal
    lines = str(shown).strip().splitlines()
    if not lines and excinfo.traceback:  # a bare assert outside a test module (no rewriting): show its line
        lines = [str(excinfo.traceback[-1].statement).strip().splitlines()[0]]
    return {"type": type(shown).__name__, "message": (lines[0] if lines else "")[:600],
            "refusal": refusal is not None, "where": _where(excinfo, tests_dir)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    outcome = _outcomes.setdefault(item.nodeid, {
        "id": item.nodeid, "function": _function(item), **_describe(_params(item)), "outcome": "passed"})
    if report.skipped and outcome["outcome"] == "passed":
        xfail = hasattr(report, "wasxfail")
        outcome["outcome"] = "xfailed" if xfail else "skipped"
        reason = report.wasxfail if xfail else (report.longrepr[2] if isinstance(report.longrepr, tuple) else "")
        outcome["reason"] = str(reason).removeprefix("Skipped: ")[:300]
    elif report.failed and outcome["outcome"] in ("passed", "skipped"):
        outcome["outcome"] = "failed" if report.when == "call" else "error"
        if call.excinfo is not None:
            outcome["error"] = _error(call.excinfo, Path(str(item.path)).parent)
        else:  # no exception: e.g. "[XPASS(strict)]", a test that should have failed
            lines = str(report.longrepr or "").strip().splitlines()
            outcome["error"] = {"type": "", "message": (lines[0] if lines else "")[:600], "refusal": False, "where": ""}


def _function(item: pytest.Item) -> str:
    """``Class::test_function`` (or ``test_function``): what the parametrized copies have in common."""
    name = getattr(item, "originalname", item.name)
    return f"{item.cls.__name__}::{name}" if getattr(item, "cls", None) is not None else name


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    if nodeid in _outcomes:
        _write(_outcomes.pop(nodeid))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if OFFLINE_MODELS:
        _write({"stand_ins": peft_offline_models.used()})


def _write(record: dict) -> None:
    if OUT:
        with open(OUT, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")

"""save_adapter under SIGKILL, concurrent writers and planted symlinks (minilora/files.py).

The promise: whatever instant a save is killed at, and however many processes save into one
directory at once, ``load_adapter`` gives one whole saved adapter (bitwise its outputs) or raises
MiniLoraError. Never the weights of one save with the config of another.

Two adapters X and Y have the same keys and shapes but different weights and lora_alpha, so a mix
of their files would load without a shape error and give outputs equal to neither.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import stat
import sys
import time

import pytest
import torch

import minilora
from minilora import MiniLoraError
from minilora.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from minilora.files import TEMP_SUFFIX
from parity.twins import randomize_adapters

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

INPUT = torch.arange(12).reshape(2, 6)


def adapted(base, alpha: float, seed: int):
    model = copy.deepcopy(base)
    minilora.inject(model, minilora.LoraConfig(r=4, lora_alpha=alpha, target_modules=["c_attn", "c_proj"]))
    randomize_adapters(model, seed=seed)
    return model


@pytest.fixture
def two_adapters(tiny_gpt2):
    """(base, {name: (model, logits)}) for X and Y."""
    models = {"X": adapted(tiny_gpt2, 8, seed=1), "Y": adapted(tiny_gpt2, 32, seed=2)}
    with torch.no_grad():
        return tiny_gpt2, {name: (model, model(INPUT).logits) for name, model in models.items()}


def outcome(base, directory, expected) -> str:
    """'X', 'Y' or 'error' for what load_adapter makes of the directory; fails on anything else."""
    model = copy.deepcopy(base)
    try:
        minilora.load_adapter(model, directory)
    except MiniLoraError:
        return "error"
    with torch.no_grad():
        logits = model(INPUT).logits
    matches = [name for name, (_, wanted) in expected.items() if torch.equal(logits, wanted)]
    assert matches, f"{sorted(os.listdir(directory))} loaded into an adapter that is neither X nor Y (a mix)"
    return matches[0]


def save_forever(models, directory, first: int = 0) -> None:
    """In a forked child: save X and Y in turn, alternating the two file formats, until killed."""
    try:
        torch.set_num_threads(1)
        names = sorted(models)
        for i in range(first, 10**9):
            model = models[names[i % 2]][0]
            minilora.save_adapter(model, directory, safe_serialization=(i // 2) % 2 == 0)
    finally:
        os._exit(0)


def fork(target, *args) -> int:
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        target(*args)  # never returns
    return pid


def test_sigkill_at_random_instants_leaves_one_whole_adapter_or_an_error(two_adapters, tmp_path):
    base, expected = two_adapters
    directory = tmp_path / "adapter"
    minilora.save_adapter(expected["X"][0], directory)
    rng = random.Random(0)
    seen = []
    for kill in range(30):
        pid = fork(save_forever, expected, directory, kill)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.append(outcome(base, directory, expected))
    assert {"X", "Y"} <= set(seen), f"the kills never landed between saves: {seen}"
    # What killed saves left behind has a name no reader opens, and the next save removes it.
    minilora.save_adapter(expected["Y"][0], directory)
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert outcome(base, directory, expected) == "Y"


def test_concurrent_writers_and_a_reader(two_adapters, tmp_path):
    """Two processes save X and Y into one directory at once while this one keeps loading it."""
    base, expected = two_adapters
    directory = tmp_path / "adapter"
    minilora.save_adapter(expected["X"][0], directory)
    writers = [fork(save_forever, {"X": expected["X"], "Y": expected["X"]}, directory),
               fork(save_forever, {"X": expected["Y"], "Y": expected["Y"]}, directory, 1)]
    try:
        seen = [outcome(base, directory, expected) for _ in range(25)]
    finally:
        for pid in writers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    seen.append(outcome(base, directory, expected))  # and what the killed writers left
    assert set(seen) - {"error"}, f"nothing could be loaded: {seen}"


def test_symlinks_in_the_directory_are_replaced_not_written_through(two_adapters, tmp_path):
    base, expected = two_adapters
    directory = tmp_path / "adapter"
    directory.mkdir()
    victims = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        victim = tmp_path / f"precious-{name}"
        victim.write_text("not yours")
        (directory / name).symlink_to(victim)
        victims[name] = victim
    minilora.save_adapter(expected["X"][0], directory)
    assert all(victim.read_text() == "not yours" for victim in victims.values())
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not any((directory / name).is_symlink() for name in os.listdir(directory))
    assert outcome(base, directory, expected) == "X"


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_both_files_get_the_same_mode(two_adapters, tmp_path, safe_serialization):
    umask = os.umask(0o022)
    try:
        minilora.save_adapter(two_adapters[1]["X"][0], tmp_path, safe_serialization=safe_serialization)
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_a_config_from_another_save_is_refused(two_adapters, tmp_path, unchanged):
    """The mix a crash between the two files would leave: Y's config next to X's weights."""
    base, expected = two_adapters
    for safe_serialization in (True, False):
        minilora.save_adapter(expected["X"][0], tmp_path / "x", safe_serialization=safe_serialization)
        minilora.save_adapter(expected["Y"][0], tmp_path / "y", safe_serialization=safe_serialization)
        (tmp_path / "x" / CONFIG_NAME).write_bytes((tmp_path / "y" / CONFIG_NAME).read_bytes())
        model = copy.deepcopy(base)
        check = unchanged(model)
        with pytest.raises(MiniLoraError, match=r"is not the config adapter_model\.(safetensors|bin) was saved "
                                                r"with .*different saves"):
            minilora.load_adapter(model, tmp_path / "x")
        check()


def test_editing_where_the_adapter_came_from_keeps_it_loadable(two_adapters, tmp_path):
    """Only the fields that decide the outputs are bound: base_model_name_or_path may be edited by hand."""
    import json

    base, expected = two_adapters
    minilora.save_adapter(expected["X"][0], tmp_path)
    fields = json.loads((tmp_path / CONFIG_NAME).read_text())
    fields["base_model_name_or_path"] = "/models/my-gpt2"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(fields))
    assert outcome(base, tmp_path, expected) == "X"

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
            saved_once()
    finally:
        os._exit(0)


_FIRST_SAVE_FD = None  # in a forked writer: where it says that its first save is complete


def saved_once() -> None:
    """Called by a forked writer after every save; the first call tells the parent (fork(wait=True))."""
    global _FIRST_SAVE_FD
    if _FIRST_SAVE_FD is not None:
        os.write(_FIRST_SAVE_FD, b".")
        os.close(_FIRST_SAVE_FD)
        _FIRST_SAVE_FD = None


def fork(target, *args, wait: bool = False) -> int:
    """Run ``target(*args)`` in a forked child; with ``wait``, return once its first save is complete,
    so that a kill after a random sleep lands in a later save whatever the machine's load (a child
    killed before it ever saved would test nothing)."""
    global _FIRST_SAVE_FD
    sys.stdout.flush(), sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _FIRST_SAVE_FD = write_end
        target(*args)  # never returns
    os.close(write_end)
    if wait:
        os.read(read_end, 1)  # (b"" if the child ended without saving: the test's checks then fail)
    os.close(read_end)
    return pid


def test_sigkill_at_random_instants_leaves_one_whole_adapter_or_an_error(two_adapters, tmp_path):
    base, expected = two_adapters
    directory = tmp_path / "adapter"
    minilora.save_adapter(expected["X"][0], directory)
    rng = random.Random(0)
    seen = []
    for kill in range(30):
        pid = fork(save_forever, expected, directory, kill, wait=True)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.append(outcome(base, directory, expected))
    assert {"X", "Y"} <= set(seen), f"the kills never landed between saves: {seen}"
    assert "error" not in seen, f"a state between two writes could not be loaded: {seen}"
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
        x, y = tmp_path / f"x-{safe_serialization}", tmp_path / f"y-{safe_serialization}"
        minilora.save_adapter(expected["X"][0], x, safe_serialization=safe_serialization)
        minilora.save_adapter(expected["Y"][0], y, safe_serialization=safe_serialization)
        (x / CONFIG_NAME).write_bytes((y / CONFIG_NAME).read_bytes())
        model = copy.deepcopy(base)
        check = unchanged(model)
        with pytest.raises(MiniLoraError, match=r"is not the config adapter_model\.(safetensors|bin) was saved "
                                                r"with .*different saves"):
            minilora.load_adapter(model, x)
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


# --------------------------------------------------------------------------------------------
# Every state a save passes through, read in between its writes
# --------------------------------------------------------------------------------------------
def states_of_a_save(monkeypatch, directory, snapshots, save) -> list:
    """Run ``save()``, copying ``directory`` aside before it starts and after each file it writes or
    removes: the states a reader (or a crash) can find it in. Returns the copies, in order."""
    import shutil

    import minilora.adapters as adapters

    states = []

    def snapshot():
        state = snapshots / f"state{len(states)}"
        shutil.copytree(directory, state, ignore=shutil.ignore_patterns(f"*{TEMP_SUFFIX}"))
        states.append(state)

    def after(function):
        def step(*args, **kwargs):
            function(*args, **kwargs)
            snapshot()
        return step

    monkeypatch.setattr(adapters, "commit", after(adapters.commit))
    monkeypatch.setattr(adapters, "remove_atomically", after(adapters.remove_atomically))
    snapshot()
    save()
    monkeypatch.undo()
    return states


@pytest.mark.parametrize("old_safetensors", [True, False], ids=["from-safetensors", "from-bin"])
@pytest.mark.parametrize("new_safetensors", [True, False], ids=["to-safetensors", "to-bin"])
def test_between_the_two_files_a_reader_finds_the_old_adapter_or_the_new_one(two_adapters, tmp_path, monkeypatch,
                                                                            old_safetensors, new_safetensors):
    """Not an error and never a mix: the new weights next to the old config load as the new adapter,
    with the config they carry (minilora/files.py). minilora.compat reads the same config."""
    from minilora.compat import PeftModel

    base, expected = two_adapters
    directory = tmp_path / "adapter"
    minilora.save_adapter(expected["X"][0], directory, safe_serialization=old_safetensors)
    states = states_of_a_save(monkeypatch, directory, tmp_path, lambda: minilora.save_adapter(
        expected["Y"][0], directory, safe_serialization=new_safetensors))
    seen = [outcome(base, state, expected) for state in states]
    assert seen[0] == "X" and seen[-1] == "Y" and "error" not in seen, seen
    assert "Y" in seen[:-1], f"no state between the writes held the new weights: {seen}"
    alphas = {"X": 8, "Y": 32}
    for state, name in zip(states, seen):
        wrapper = PeftModel.from_pretrained(copy.deepcopy(base), str(state))
        assert wrapper.peft_config["default"].lora_alpha == alphas[name]
        with torch.no_grad():
            assert torch.equal(wrapper(INPUT).logits, expected[name][1])


def test_a_config_edited_by_hand_is_still_refused(two_adapters, tmp_path, unchanged):
    """Only the config the save replaced lets the weights' own config be used: any other is refused."""
    import json

    base, expected = two_adapters
    minilora.save_adapter(expected["X"][0], tmp_path)
    minilora.save_adapter(expected["Y"][0], tmp_path)  # (replaces X's config)
    fields = json.loads((tmp_path / CONFIG_NAME).read_text())
    fields["lora_alpha"] = 16
    (tmp_path / CONFIG_NAME).write_text(json.dumps(fields))
    model = copy.deepcopy(base)
    check = unchanged(model)
    with pytest.raises(MiniLoraError, match=r"is not the config adapter_model\.safetensors was saved with"):
        minilora.load_adapter(model, tmp_path)
    check()


def two_versions_with_two_adapters(base):
    """X and Y: each a model with adapters "default" and "other", of other weights and alphas."""
    versions = {}
    for version, (alpha, seed) in {"X": (8, 1), "Y": (32, 2)}.items():
        model = adapted(base, alpha, seed)
        minilora.add_adapter(model, "other", minilora.LoraConfig(r=2, lora_alpha=alpha / 2, target_modules=["c_fc"]))
        randomize_adapters(model, seed=seed + 10)
        versions[version] = model
    return versions


def adapter_logits(base, versions, tmp_path) -> dict:
    """{adapter: {version: logits of that adapter loaded alone into the base}}, for outcome()."""
    logits = {"default": {}, "other": {}}
    for version, model in versions.items():
        minilora.save_adapters(model, tmp_path / f"reference-{version}")
        for name, sub in (("default", ""), ("other", "other")):
            loaded = minilora.load_adapter(copy.deepcopy(base), tmp_path / f"reference-{version}" / sub)
            with torch.no_grad():
                logits[name][version] = (None, loaded(INPUT).logits)
    return logits


def save_adapters_forever(versions, directory, first: int = 0) -> None:
    try:
        torch.set_num_threads(1)
        for i in range(first, 10**9):
            minilora.save_adapters(versions["XY"[i % 2]], directory, safe_serialization=(i // 2) % 2 == 0)
            saved_once()
    finally:
        os._exit(0)


def test_sigkill_during_a_save_of_several_adapters(tiny_gpt2, tmp_path):
    """save_adapters writes PEFT's layout (default at the root, the others in sub-folders): killed at
    any instant, each adapter's folder loads as one whole version of that adapter, never an error.
    (The folders are saved one after the other, so the root and a sub-folder may be of two versions.)"""
    versions = two_versions_with_two_adapters(tiny_gpt2)
    expected = adapter_logits(tiny_gpt2, versions, tmp_path)
    directory = tmp_path / "adapters"
    minilora.save_adapters(versions["X"], directory)
    rng = random.Random(1)
    seen = {"default": [], "other": []}
    for kill in range(16):
        pid = fork(save_adapters_forever, versions, directory, kill, wait=True)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for name, sub in (("default", directory), ("other", directory / "other")):
            seen[name].append(outcome(tiny_gpt2, sub, expected[name]))
    assert all("error" not in outcomes for outcomes in seen.values()), seen
    assert {"X", "Y"} <= set(seen["default"]), seen


def save_configs_forever(directory, first: int = 0) -> None:
    from minilora.compat import LoraConfig

    try:
        configs = [LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]),
                   LoraConfig(r=8, lora_alpha=32, target_modules=["c_fc", "c_proj"])]
        for i in range(first, 10**9):
            configs[i % 2].save_pretrained(directory)
            saved_once()
    finally:
        os._exit(0)


def test_sigkill_during_lora_config_save_pretrained(tmp_path):
    """The config-only save: killed at any instant, adapter_config.json is one whole config."""
    from minilora.compat import LoraConfig

    LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]).save_pretrained(tmp_path)
    rng = random.Random(2)
    seen = []
    for kill in range(20):
        pid = fork(save_configs_forever, tmp_path, kill, wait=True)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        config = LoraConfig.from_pretrained(tmp_path)
        seen.append((config.r, config.lora_alpha, sorted(config.target_modules)))
    assert {(r, a, tuple(t)) for r, a, t in seen} <= {(4, 8, ("c_attn",)), (8, 32, ("c_fc", "c_proj"))}, seen
    assert len({r for r, _, _ in seen}) == 2, f"the kills never landed between saves: {seen}"


def test_compat_loads_the_files_as_it_read_them_while_another_save_lands(two_adapters, tmp_path, monkeypatch):
    """PeftModel.from_pretrained reads the directory once: a save of Y landing after that read (another
    process) does not give it X's config object with Y's weights, or the reverse."""
    import minilora.adapters as adapters
    from minilora.compat import PeftModel

    base, expected = two_adapters
    minilora.save_adapter(expected["X"][0], tmp_path)
    real_load = adapters.load_adapter

    def load_after_another_save(*args, **kwargs):
        minilora.save_adapter(expected["Y"][0], tmp_path)  # lands between the read and the load
        return real_load(*args, **kwargs)
    monkeypatch.setattr(adapters, "load_adapter", load_after_another_save)
    wrapper = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    monkeypatch.undo()
    assert wrapper.peft_config["default"].lora_alpha == 8  # X's
    with torch.no_grad():
        assert torch.equal(wrapper(INPUT).logits, expected["X"][1])


def test_weights_read_with_their_own_config_say_so(two_adapters, tmp_path):
    """The folder as a save leaves it between its two renames (Y's weights, X's config, the one Y's save
    replaced): it loads as Y, with a warning, since a config edited by hand back to X's looks the same."""
    base, expected = two_adapters
    minilora.save_adapter(expected["X"][0], tmp_path)
    config_of_x = (tmp_path / "adapter_config.json").read_bytes()
    minilora.save_adapter(expected["Y"][0], tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(config_of_x)
    with pytest.warns(UserWarning, match="read with the config saved in the weights"):
        assert outcome(base, tmp_path, expected) == "Y"

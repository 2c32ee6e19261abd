"""Saves that fail: a full disk in the middle of a file, a permission denied, a file where a folder
should be, an adapter name that is not a folder name. Each is one MiniLoraError that says what to do,
and what was on disk before is still there, byte for byte, and still loads as it did; no temporary
file is left behind. (Killed saves: tests/test_crash_safety.py.)
"""

from __future__ import annotations

import copy
import errno
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minilora
from minilora import MiniLoraError
from minilora.compat import LoraConfig as CompatLoraConfig
from minilora.compat import PeftModel, get_peft_model
from parity.twins import randomize_adapters

from disk import files_state, refuse_new_files_in

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT = torch.arange(12).reshape(2, 6)


def adapted(base, alpha, seed):
    model = copy.deepcopy(base)
    minilora.inject(model, minilora.LoraConfig(r=4, lora_alpha=alpha, target_modules=["c_attn"]))
    randomize_adapters(model, seed=seed)
    return model


def logits_of(base, directory) -> torch.Tensor:
    model = minilora.load_adapter(copy.deepcopy(base), directory)
    with torch.no_grad():
        return model(INPUT).logits


class FailingWrites:
    """os.fdopen whose ``fail_at``-th file (counting from 1) writes half its bytes and then raises ``error``."""

    def __init__(self, fail_at: int, error: OSError) -> None:
        self.fail_at, self.error, self.opened = fail_at, error, 0
        self.real = os.fdopen

    def __call__(self, descriptor, mode="r", *args, **kwargs):
        file = self.real(descriptor, mode, *args, **kwargs)
        self.opened += 1
        if self.opened != self.fail_at:
            return file
        error, real_write = self.error, file.write

        def write(data):
            real_write(bytes(data)[:len(data) // 2])
            raise error
        file.write = write
        return file


SAVES = {
    "save_adapter": lambda model, directory: minilora.save_adapter(model, directory),
    "save_adapter-bin": lambda model, directory: minilora.save_adapter(model, directory, safe_serialization=False),
    "save_adapters": lambda model, directory: minilora.save_adapters(model, directory),
}


@pytest.mark.parametrize("fail_at", [1, 2], ids=["weights", "config"])
@pytest.mark.parametrize("save", list(SAVES.values()), ids=list(SAVES))
@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device"), r"No space left on device.*Free some space"),
    (PermissionError(errno.EACCES, "Permission denied"), r"Permission denied.*a directory you can write to"),
], ids=["disk-full", "permission-denied"])
def test_a_failed_write_leaves_the_old_adapter(tiny_gpt2, tmp_path, monkeypatch, fail_at, save, error, words):
    old, new = adapted(tiny_gpt2, 8, seed=1), adapted(tiny_gpt2, 32, seed=2)
    directory = tmp_path / "adapter"
    minilora.save_adapter(old, directory)
    before, old_logits = files_state(directory), logits_of(tiny_gpt2, directory)
    monkeypatch.setattr(os, "fdopen", FailingWrites(fail_at, error))
    with pytest.raises(MiniLoraError, match=words):
        save(new, directory)
    monkeypatch.undo()
    assert files_state(directory) == before, "a failed save changed the directory"
    assert torch.equal(logits_of(tiny_gpt2, directory), old_logits)


def test_a_failed_first_save_leaves_no_folder(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fdopen", FailingWrites(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(MiniLoraError, match=r"No space left"):
        minilora.save_adapter(adapted(tiny_gpt2, 8, seed=1), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_of_a_config_alone_leaves_the_old_one(tmp_path, monkeypatch):
    CompatLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]).save_pretrained(tmp_path)
    before = files_state(tmp_path)
    monkeypatch.setattr(os, "fdopen", FailingWrites(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(MiniLoraError, match=r"No space left on device.*Free some space"):
        CompatLoraConfig(r=8, lora_alpha=16, target_modules=["c_fc"]).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert files_state(tmp_path) == before
    assert CompatLoraConfig.from_pretrained(tmp_path).r == 4


@pytest.fixture
def wrapper_with_two_adapters(tiny_gpt2):
    model = get_peft_model(copy.deepcopy(tiny_gpt2), CompatLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    model.add_adapter("other", CompatLoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"]))
    return model


@pytest.mark.parametrize("save", [
    lambda model, path: minilora.save_adapter(model.get_base_model(), path),
    lambda model, path: minilora.save_adapters(model.get_base_model(), path),
    lambda model, path: model.save_pretrained(path),
    lambda model, path: model.peft_config["default"].save_pretrained(path),
], ids=["save_adapter", "save_adapters", "compat-save_pretrained", "config-save_pretrained"])
def test_a_file_where_the_folder_should_be(wrapper_with_two_adapters, tmp_path, save):
    target = tmp_path / "adapter"
    target.write_text("precious")
    with pytest.raises(MiniLoraError, match=r"is a file|should be a directory|it is a file"):
        save(wrapper_with_two_adapters, target)
    assert target.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.parametrize("save", [
    lambda model, path: minilora.save_adapters(model.get_base_model(), path),
    lambda model, path: model.save_pretrained(path),
], ids=["save_adapters", "compat-save_pretrained"])
def test_a_file_where_a_sub_folder_should_be_is_found_before_anything_is_written(wrapper_with_two_adapters, tmp_path,
                                                                                 save):
    (tmp_path / "other").write_text("precious")
    with pytest.raises(MiniLoraError, match=r"other is a file"):
        save(wrapper_with_two_adapters, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["other"] and (tmp_path / "other").read_text() == "precious"


def two_adapter_wrappers(base, name):
    """minilora's PeftModel and PEFT's, each with "default" and an adapter named ``name``."""
    import peft

    ours = get_peft_model(copy.deepcopy(base), CompatLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    ours.add_adapter(name, CompatLoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    theirs.add_adapter(name, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"]))
    return ours, theirs


@pytest.mark.parametrize("name", ["a/b", "a\\b", "x//y", "x/"])
@pytest.mark.parametrize("how", ["save_adapters", "compat-save_pretrained"])
def test_an_adapter_name_with_slashes_is_saved_where_peft_saves_it(tiny_gpt2, tmp_path, name, how):
    """PEFT's save_pretrained puts adapter ``a/b`` in ``os.path.join(folder, "a/b")``: the folder ``b`` inside
    ``a``, inside the save folder (``a\\b`` on POSIX: one folder of that name). minilora writes the same
    files, and its folder loads back into PEFT with that adapter's weights."""
    import peft

    ours, theirs = two_adapter_wrappers(tiny_gpt2, name)
    theirs.save_pretrained(tmp_path / "peft")
    if how == "save_adapters":
        minilora.save_adapters(ours.get_base_model(), tmp_path / "ours")
    else:
        ours.save_pretrained(tmp_path / "ours")
    peft_files = {path for path, kind in files_state(tmp_path / "peft").items() if kind != "dir"}
    if how == "save_adapters":
        peft_files.discard("README.md")  # (save_adapters writes no model card)
    assert {path for path, kind in files_state(tmp_path / "ours").items() if kind != "dir"} == peft_files
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), tmp_path / "ours", subfolder=name.rstrip("/"))
    ours_state = {key: value for key, value in ours.get_base_model().state_dict().items() if f".{name}." in key}
    theirs_state = {key.replace(".default.", f".{name}.").removeprefix("base_model.model."): value
                    for key, value in loaded.state_dict().items() if "lora_" in key}
    assert ours_state.keys() == theirs_state.keys() and ours_state
    assert all(torch.equal(ours_state[key], theirs_state[key]) for key in ours_state)


@pytest.mark.parametrize("how", ["save_adapters", "compat-save_pretrained"])
def test_an_adapter_name_that_leads_out_of_the_folder_is_not_saved(tiny_gpt2, tmp_path, how):
    """PEFT would write adapter ``/tmp/x`` at /tmp/x itself (os.path.join drops the folder before an absolute
    path); minilora refuses, before writing anything. (``..`` cannot be a name: names hold no dots.)"""
    wrapper, _ = two_adapter_wrappers(tiny_gpt2, "/tmp/minilora-escaped")
    target = tmp_path / "save"
    with pytest.raises(MiniLoraError, match=r"is a path that leads out of .*save.*rename the adapter"):
        if how == "save_adapters":
            minilora.save_adapters(wrapper.get_base_model(), target)
        else:
            wrapper.save_pretrained(target)
    assert not target.exists() and not Path("/tmp/minilora-escaped").exists()


def test_a_failed_write_of_a_nested_adapter_leaves_no_folder(tiny_gpt2, tmp_path, monkeypatch):
    """Adapter ``a/b`` into a new save folder, the disk full at its weights: the folders ``a`` and ``a/b`` that
    the write created are gone again; the adapters written before it stay (a save of several is not one step)."""
    wrapper, _ = two_adapter_wrappers(tiny_gpt2, "a/b")
    monkeypatch.setattr(os, "fdopen", FailingWrites(3, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(MiniLoraError, match=r"No space left on device"):
        minilora.save_adapters(wrapper.get_base_model(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_two_adapter_names_that_share_a_folder_are_not_saved(tiny_gpt2, tmp_path):
    """``x`` and ``x/`` land in one folder (PEFT saves the second over the first): refused before writing."""
    wrapper, _ = two_adapter_wrappers(tiny_gpt2, "x")
    wrapper.add_adapter("x/", CompatLoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"]))
    with pytest.raises(MiniLoraError, match=r"Adapters 'x' and 'x/' would both be saved in .*x \(the second over"):
        wrapper.save_pretrained(tmp_path / "save")
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("subfolder", ["../outside", "/tmp", "a/../../outside"])
def test_a_subfolder_outside_the_adapter_folder_is_refused(tiny_gpt2, tmp_path, subfolder):
    inside = tmp_path / "adapters" / "inside"
    minilora.save_adapter(adapted(tiny_gpt2, 8, seed=1), tmp_path / "outside")
    inside.mkdir(parents=True)
    model = copy.deepcopy(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"must be a folder inside"):
        PeftModel.from_pretrained(model, str(tmp_path / "adapters"), subfolder=subfolder)
    assert not any(True for _ in minilora.lora_layers(model))


def test_a_model_card_symlink_is_replaced_not_written_through(wrapper_with_two_adapters, tmp_path):
    victim = tmp_path / "victim.md"
    victim.write_text("---\nlicense: mit\n---\nnot yours\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").symlink_to(victim)
    wrapper_with_two_adapters.save_pretrained(tmp_path / "out")
    assert victim.read_text() == "---\nlicense: mit\n---\nnot yours\n"
    assert not (tmp_path / "out" / "README.md").is_symlink()


def test_a_model_card_that_is_not_a_file_is_refused_before_anything_is_written(wrapper_with_two_adapters, tmp_path):
    (tmp_path / "README.md").symlink_to("/dev/zero")
    with pytest.raises(MiniLoraError, match=r"README\.md is not a regular file"):
        wrapper_with_two_adapters.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md"]


@pytest.mark.parametrize("existing", ["absent", "empty"])
def test_merge_command_leaves_no_half_written_model(tiny_gpt2, tmp_path, monkeypatch, capsys, existing):
    """A merge that fails while saving (here: a full disk after config.json) leaves no OUT_DIR, where a
    config.json without its weights would load with random weights; a merge that succeeds leaves it whole."""
    import transformers

    from minilora import cli

    tiny_gpt2.save_pretrained(tmp_path / "base")
    minilora.save_adapter(adapted(tiny_gpt2, 8, seed=1), tmp_path / "adapter")
    out = tmp_path / "merged"
    if existing == "empty":
        out.mkdir()
    real_save = transformers.PreTrainedModel.save_pretrained

    def full_disk(self, directory, *args, **kwargs):
        os.makedirs(directory, exist_ok=True)
        Path(directory, "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    argv = ["merge", str(tmp_path / "adapter"), str(out), "--model", str(tmp_path / "base")]
    assert cli.main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", "base", *(["merged"] if existing == "empty" else [])])
    assert not out.exists() or os.listdir(out) == []
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real_save)
    assert cli.main(argv) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "merged"]
    with torch.no_grad():
        assert torch.allclose(merged(INPUT).logits, logits_of(tiny_gpt2, tmp_path / "adapter"), atol=1e-5)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"])
def test_a_folder_where_a_file_goes_is_found_before_anything_is_written(tiny_gpt2, tmp_path, name):
    (tmp_path / name).mkdir()
    before = files_state(tmp_path)
    with pytest.raises(MiniLoraError, match=rf"{name} is a folder, where save_adapter writes a file"):
        minilora.save_adapter(adapted(tiny_gpt2, 8, seed=1), tmp_path)
    assert files_state(tmp_path) == before


@pytest.mark.parametrize("metadata", [
    {"carried": "not json"}, {"carried": "[1, 2]"}, {"carried": "other"}, {"replaces": "0" * 64}, {"carried": None},
], ids=["carried-not-json", "carried-not-an-object", "carried-another-config", "replaces-another-config",
        "carries-none"])
def test_weights_that_carry_a_config_only_use_it_when_it_is_theirs(tiny_gpt2, tmp_path, metadata):
    """The weights' own config replaces adapter_config.json only when it is the config whose digest they
    record and adapter_config.json is the one they say they replace (minilora/files.py); else the
    mismatch is refused as before."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from minilora.adapter_config import DIGESTED_FIELDS
    from minilora.files import CONFIG_KEY, REPLACES_KEY, config_digest

    minilora.save_adapter(adapted(tiny_gpt2, 8, seed=1), tmp_path / "old")
    minilora.save_adapter(adapted(tiny_gpt2, 32, seed=2), tmp_path / "new")
    old_config = (tmp_path / "old" / "adapter_config.json").read_bytes()
    with safe_open(tmp_path / "new" / "adapter_model.safetensors", "pt") as file:
        carried = file.metadata()
    # The state between the two renames of a save of "new" over "old", with the weights' metadata spoiled:
    carried[REPLACES_KEY] = metadata.get("replaces") or config_digest(json.loads(old_config), DIGESTED_FIELDS)
    if "carried" in metadata:
        other = {**json.loads(carried[CONFIG_KEY]), "lora_alpha": 4}
        text = {"other": json.dumps(other)}.get(metadata["carried"], metadata["carried"])
        carried.pop(CONFIG_KEY) if text is None else carried.__setitem__(CONFIG_KEY, text)
    directory = tmp_path / "between"
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes(old_config)
    save_file(load_file(tmp_path / "new" / "adapter_model.safetensors"), directory / "adapter_model.safetensors",
              metadata=carried)
    model = copy.deepcopy(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"is not the config adapter_model\.safetensors was saved with"):
        minilora.load_adapter(model, directory)
    assert not any(True for _ in minilora.lora_layers(model))


def test_merge_command_into_a_symlink_to_a_folder_writes_through_it(tiny_gpt2, tmp_path):
    from minilora import cli

    tiny_gpt2.save_pretrained(tmp_path / "base")
    minilora.save_adapter(adapted(tiny_gpt2, 8, seed=1), tmp_path / "adapter")
    (tmp_path / "target").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "target")
    assert cli.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "out"), "--model", str(tmp_path / "base")]) == 0
    assert (tmp_path / "out").is_symlink() and (tmp_path / "target" / "config.json").is_file()


SAVES_OF_TWO = {
    "save_adapters": lambda model, path: minilora.save_adapters(model.get_base_model(), path),
    "compat-save_pretrained": lambda model, path: model.save_pretrained(path),
}


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"])
@pytest.mark.parametrize("save", list(SAVES_OF_TWO.values()), ids=list(SAVES_OF_TWO))
def test_a_folder_where_a_later_adapters_file_goes_is_found_before_anything_is_written(wrapper_with_two_adapters,
                                                                                       tmp_path, name, save):
    """The second adapter's folder holds a folder where one of its files goes: refused before the first
    adapter (saved first, at the root) is written; the tree is as it was, byte for byte."""
    (tmp_path / "other" / name).mkdir(parents=True)
    (tmp_path / "other" / name / "keep").write_text("precious")
    before = files_state(tmp_path)
    with pytest.raises(MiniLoraError, match=rf"other/{name} is a folder, where save_adapter writes a file\. Remove it"):
        save(wrapper_with_two_adapters, tmp_path)
    assert files_state(tmp_path) == before


@pytest.mark.parametrize("save", list(SAVES_OF_TWO.values()), ids=list(SAVES_OF_TWO))
def test_a_later_adapter_that_cannot_be_saved_is_found_before_anything_is_written(wrapper_with_two_adapters,
                                                                                  tmp_path, save):
    """A model check of the second adapter (its config no longer selects its layers) also runs before the
    first adapter is written: into a new folder, nothing is created."""
    from minilora.inject import adapter_configs

    adapter_configs(wrapper_with_two_adapters.get_base_model())["other"].target_modules = ["c_proj"]
    with pytest.raises(MiniLoraError, match=r"target_modules was changed after inject"):
        save(wrapper_with_two_adapters, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("save", list(SAVES_OF_TWO.values()), ids=list(SAVES_OF_TWO))
def test_each_adapters_bytes_are_made_when_it_is_written(wrapper_with_two_adapters, tmp_path, monkeypatch, save):
    """Several adapters: all checked first (tests above), then each one's bytes made and written before
    the next one's are made, so that at most one adapter's bytes (whole embedding matrices, with
    save_embedding_layers) are held at a time. The files are those of one save_adapter per adapter."""
    from minilora import adapters

    events = []
    make, stage = adapters.PreparedSave.weights, adapters.stage
    monkeypatch.setattr(adapters.PreparedSave, "weights",
                        lambda self: events.append(("bytes", self.directory.name)) or make(self))
    monkeypatch.setattr(adapters, "stage", lambda path, data: events.append(("write", path.parent.name)) or
                        stage(path, data))
    save(wrapper_with_two_adapters, tmp_path / "both")
    assert events == [("bytes", "both"), ("write", "both"), ("write", "both"),
                      ("bytes", "other"), ("write", "other"), ("write", "other")]
    monkeypatch.undo()
    base = wrapper_with_two_adapters.get_base_model()
    for name, path in (("default", tmp_path / "both"), ("other", tmp_path / "both" / "other")):
        minilora.save_adapter(base, tmp_path / name, adapter_name=name)
        assert load_file(path / "adapter_model.safetensors").keys() == load_file(
            tmp_path / name / "adapter_model.safetensors").keys()
        for key, value in load_file(path / "adapter_model.safetensors").items():
            assert torch.equal(value, load_file(tmp_path / name / "adapter_model.safetensors")[key]), key


def _two_adapters(base):
    model = adapted(base, 8, seed=1)
    minilora.add_adapter(model, "b", minilora.LoraConfig(r=2, target_modules=["c_attn"]))
    return model


def test_save_adapters_probes_every_folder_before_the_first_write(tiny_gpt2, tmp_path, monkeypatch):
    """A second adapter's folder that cannot be written (EACCES planted on files made in it: chmod does not
    stop root) is found before the first adapter is written: nothing on disk changes."""
    model = _two_adapters(tiny_gpt2)
    minilora.save_adapters(model, tmp_path)
    before = files_state(tmp_path)
    randomize_adapters(model, seed=5, std=0.2)  # (other values: a write would change the files)
    refuse_new_files_in(tmp_path / "b", monkeypatch)
    with pytest.raises(MiniLoraError, match="Adapter folder .*/b' cannot be written"):
        minilora.save_adapters(model, tmp_path)
    assert files_state(tmp_path) == before


def test_save_adapters_failing_after_a_first_write_says_which_were_saved(tiny_gpt2, tmp_path, monkeypatch):
    """A write that fails after the first adapter was saved (a full disk, not checkable beforehand) must not
    say that nothing changed: it names the adapters saved and the one that failed."""
    from minilora import adapters

    model = _two_adapters(tiny_gpt2)
    real_stage = adapters.stage

    def stage_full(path, data):
        if Path(path).parent.name == "b":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_stage(path, data)

    monkeypatch.setattr(adapters, "stage", stage_full)
    with pytest.raises(MiniLoraError, match=r"Saving adapter 'b' failed after \['default'\] were saved") as error:
        minilora.save_adapters(model, tmp_path)
    assert "unchanged" not in str(error.value).split("failed after")[0]
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "b" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("error", [MemoryError(), OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()],
                         ids=["MemoryError", "OSError", "KeyboardInterrupt"])
@pytest.mark.parametrize("save", list(SAVES_OF_TWO.values()), ids=list(SAVES_OF_TWO))
def test_any_failure_after_a_first_write_says_which_were_saved(wrapper_with_two_adapters, tmp_path, monkeypatch,
                                                               error, save):
    """Not only a MiniLoraError: any error while making or writing a later adapter's bytes (planted: out of
    memory, an I/O error, an interrupt) names the adapters already saved, whose files are complete on disk
    (they load back as the model's), and leaves the failed one's folder as it was. An error is a
    MiniLoraError chained from the original; an interrupt stays an interrupt, with that note."""
    from minilora import adapters

    base = wrapper_with_two_adapters.get_base_model()
    minilora.save_adapters(base, tmp_path)
    before = files_state(tmp_path / "other")
    randomize_adapters(base, seed=4, std=0.2)  # (new values: each adapter's files differ from the saved ones)
    make = adapters.PreparedSave.weights

    def failing(self):
        if self.directory.name == "other":
            raise error
        return make(self)

    monkeypatch.setattr(adapters.PreparedSave, "weights", failing)
    saved = r"Saving adapter 'other' failed after \['default'\] were saved \(their folders hold the new files"
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt) as raised:
            save(wrapper_with_two_adapters, tmp_path)
        assert raised.value is error and re.search(saved, "\n".join(raised.value.__notes__))
    else:
        with pytest.raises(MiniLoraError, match=saved + rf".*{type(error).__name__}.*selected_adapters=\['other'\]") \
                as raised:
            save(wrapper_with_two_adapters, tmp_path)
        assert raised.value.__cause__ is error
        said = {"MemoryError": "MemoryError. Then", "OSError": "OSError: [Errno 5] Input/output error. Then"}
        assert f"as before): {said[type(error).__name__]} save the rest again" in str(raised.value)
    monkeypatch.undo()
    assert files_state(tmp_path / "other") == before
    loaded = load_file(tmp_path / "adapter_model.safetensors")
    expected = {f"base_model.model.{key}".replace(".default.", "."): value for key, value in base.state_dict().items()
                if ".default." in key}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[key], expected[key]) for key in loaded)


@pytest.mark.parametrize("existing", ["absent", "saved"])
def test_save_adapter_probes_its_folder_before_any_work(tiny_gpt2, tmp_path, monkeypatch, existing):
    """A single save_adapter into a folder that cannot be written (EACCES planted on files made in it, or in
    its parent for a new folder) fails on the same probe as save_adapters, before the weights' bytes are made:
    one MiniLoraError naming the folder, nothing on disk changed."""
    from minilora.adapters import PreparedSave

    directory = tmp_path / "adapter"
    if existing == "saved":
        minilora.save_adapter(adapted(tiny_gpt2, 8, seed=1), directory)
    before = files_state(tmp_path)
    refused = directory if existing == "saved" else tmp_path

    def no_bytes(self):
        raise AssertionError("the weights' bytes were made before the folder was probed")

    refuse_new_files_in(refused, monkeypatch)
    monkeypatch.setattr(PreparedSave, "weights", no_bytes)
    with pytest.raises(MiniLoraError, match=rf"Adapter folder '{directory}' cannot be written \(Permission denied\)"):
        minilora.save_adapter(adapted(tiny_gpt2, 32, seed=2), directory)
    monkeypatch.undo()
    assert files_state(tmp_path) == before

"""``minilora merge ... OUT_DIR --force`` into a folder that holds a model: OUT_DIR ends up holding the whole
old folder or the whole merged model, never a mix (minilora/files.py, ``replaced_folder``).

Failures are planted at each step (the write, the flush, each rename, the removal of the old folder), as
errors in this process and as crashes (``os._exit`` in a forked child, so nothing is cleaned up). The
oracle for "old" and "new" is the folder's bytes before the merge and the logits of the adapter that
each merge folds in, loaded by minilora.load_adapter (tolerance 1e-5, the merge's float rounding).
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers

import minilora
from minilora import cli
from minilora.files import OLD_SUFFIX, TEMP_SUFFIX
from parity.twins import randomize_adapters

from disk import files_state

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT = torch.arange(12).reshape(2, 6)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


class Setup:
    """A saved tiny GPT-2, two adapters ("old", "new"), and OUT_DIR holding the merge of "old" plus a note."""

    def __init__(self, base, tmp_path: Path) -> None:
        self.root, self.out = tmp_path, tmp_path / "out"
        base.save_pretrained(tmp_path / "base")
        self.expected = {}
        for name, seed in (("old", 1), ("new", 2)):
            model = copy.deepcopy(base)
            minilora.inject(model, minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
            randomize_adapters(model, seed=seed)
            minilora.save_adapter(model, tmp_path / f"adapter-{name}")
            self.expected[name] = logits(minilora.load_adapter(copy.deepcopy(base), tmp_path / f"adapter-{name}"))
        assert self.merge("old", force=False) == 0
        (self.out / "notes.txt").write_text("written by hand")  # replaced with the rest by --force
        self.before = files_state(self.out)
        self.listing = sorted(os.listdir(tmp_path))

    def merge(self, adapter: str, force: bool = True) -> int:
        return cli.main(["merge", str(self.root / f"adapter-{adapter}"), str(self.out), "--model",
                         str(self.root / "base"), *(["--force"] if force else [])])

    def holds(self, folder: Path) -> str:
        """'old' (OUT_DIR's bytes before the merge) or 'new' (the merged model of adapter-new); fails otherwise."""
        if files_state(folder) == self.before:
            return "old"
        assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors"], \
            f"{folder} holds a mix: {sorted(os.listdir(folder))}"
        merged = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert torch.allclose(logits(merged), self.expected["new"], atol=1e-5)
        return "new"


@pytest.fixture
def setup(tiny_gpt2, tmp_path):
    return Setup(tiny_gpt2, tmp_path)


def test_force_replaces_the_folder_whole(setup, capsys):
    assert setup.merge("new") == 0
    assert setup.holds(setup.out) == "new"  # notes.txt is gone with the old model
    assert sorted(os.listdir(setup.root)) == setup.listing  # no temporary folder left
    assert "Merged 2 LoRA layers" in capsys.readouterr().out  # (tiny GPT-2: 2 blocks, c_attn each)


class FailingRenames:
    """os.rename that raises EIO on the calls numbered in ``fail`` (from 1), counting those in ``folder``."""

    def __init__(self, folder: Path, fail: set[int]) -> None:
        self.folder, self.fail, self.calls, self.real = folder, fail, 0, os.rename

    def __call__(self, source, target, *args, **kwargs):
        if Path(source).parent == self.folder:
            self.calls += 1
            if self.calls in self.fail:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(source))
        return self.real(source, target, *args, **kwargs)


def plant(step: str, setup: Setup, monkeypatch) -> None:
    if step == "writing":  # a full disk after config.json
        def full_disk(self, directory, *args, **kwargs):
            Path(directory, "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    elif step == "flushing":
        def failing_fsync(descriptor):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(os, "fsync", failing_fsync)
    else:  # the first rename (OUT_DIR aside) or the second (the merged model in; the old one is put back)
        monkeypatch.setattr(os, "rename", FailingRenames(setup.root, {{"renaming-aside": 1, "renaming-in": 2}[step]}))


@pytest.mark.parametrize("step", ["writing", "flushing", "renaming-aside", "renaming-in"])
def test_a_failure_at_any_step_leaves_the_old_folder_whole(setup, monkeypatch, capsys, step):
    plant(step, setup, monkeypatch)
    assert setup.merge("new") == cli.ERROR_EXIT
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "minilora: error: Could not" in err and "what was there before is unchanged" in err, err
    assert setup.holds(setup.out) == "old"
    assert sorted(os.listdir(setup.root)) == setup.listing
    assert setup.merge("new") == 0 and setup.holds(setup.out) == "new"  # and the same merge then works


def test_a_failed_swap_that_cannot_be_undone_says_where_each_folder_is(setup, monkeypatch, capsys):
    """The merged model cannot be renamed in, nor the old folder back: OUT_DIR is absent, and the message
    names the folder holding the old contents and the one holding the merged model, both whole."""
    monkeypatch.setattr(os, "rename", FailingRenames(setup.root, {2, 3}))
    assert setup.merge("new") == cli.ERROR_EXIT
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "is now absent" in err and "Rename one of them to" in err, err
    assert not setup.out.exists()
    old = next(setup.root.glob(f".out.*{OLD_SUFFIX}"))
    new = next(setup.root.glob(f".out.*{TEMP_SUFFIX}"))
    assert str(old) in err and str(new) in err
    assert setup.holds(old) == "old" and setup.holds(new) == "new"


def test_an_old_folder_that_cannot_be_removed_is_named_in_a_warning(setup, monkeypatch):
    real_rmtree = shutil.rmtree

    def keeping_old(path, *args, **kwargs):
        if not str(path).endswith(OLD_SUFFIX):
            real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", keeping_old)
    with pytest.warns(UserWarning, match=rf"could not all be removed.*Remove that folder by hand"):
        assert setup.merge("new") == 0
    assert setup.holds(setup.out) == "new"


# Crashes: a forked child runs the merge and exits (no cleanup) at one step. After each, OUT_DIR holds
# the old folder or the new model, or, killed between the two renames, is absent with the old folder
# whole beside it; the next merge removes what the dead child left.
def crash_at(step: str, setup: Setup) -> None:
    """In a forked child: merge adapter-new with os._exit at ``step``."""
    try:
        torch.set_num_threads(1)
        real_rename, real_rmtree, renames = os.rename, shutil.rmtree, []
        if step == "writing":
            def half_written(self, directory, *args, **kwargs):
                Path(directory, "config.json").write_text("{}")
                os._exit(CRASHED)
            transformers.PreTrainedModel.save_pretrained = half_written

        def rename(source, target, *args, **kwargs):
            real_rename(source, target, *args, **kwargs)
            if Path(source).parent == setup.root:
                renames.append(target)
                if (step, len(renames)) in (("after-aside", 1), ("after-in", 2)):
                    os._exit(CRASHED)

        def rmtree(path, *args, **kwargs):
            if str(path).endswith(OLD_SUFFIX) and step == "removing":
                os.unlink(Path(path, "config.json"))  # one file of the old folder gone, then the crash
                os._exit(CRASHED)
            real_rmtree(path, *args, **kwargs)
        os.rename, shutil.rmtree = rename, rmtree
        setup.merge("new")
    finally:
        os._exit(1)  # the planted crash never came: the test fails on this status


CRASHED = 17  # the child's exit status at a planted crash


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
@pytest.mark.parametrize("step, outcome", [
    ("writing", "old"), ("after-aside", "absent"), ("after-in", "new"), ("removing", "new")])
def test_a_crash_at_any_step_leaves_the_old_folder_or_the_new_one(setup, step, outcome):
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        crash_at(step, setup)  # never returns
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == CRASHED, "the planted crash did not happen"
    if outcome == "absent":
        assert not setup.out.exists()
        assert setup.holds(next(setup.root.glob(f".out.{pid}.*{OLD_SUFFIX}"))) == "old"
    else:
        assert setup.holds(setup.out) == outcome
    assert setup.merge("new") == 0 and setup.holds(setup.out) == "new"
    assert sorted(os.listdir(setup.root)) == setup.listing  # the dead child's folders are gone


def test_out_dir_holding_the_adapter_the_model_or_the_current_directory_is_refused(setup, capsys, monkeypatch):
    """--force replaces OUT_DIR with all it holds: an OUT_DIR that holds ADAPTER_DIR, --model or the current
    directory (or is one of them) is refused before any work."""
    (setup.root / "work").mkdir()
    monkeypatch.chdir(setup.root / "work")
    for out, what in [(setup.root / "base", "--model"), (setup.root / "adapter-new", "ADAPTER_DIR"),
                      (setup.root / "work", "the current directory"), (Path("."), "the current directory")]:
        before = files_state(setup.root)
        argv = ["merge", str(setup.root / "adapter-new"), str(out), "--model", str(setup.root / "base"), "--force"]
        assert cli.main(argv) == cli.ERROR_EXIT
        err = capsys.readouterr().err
        assert f"holds {what}" in err and "Pass an OUT_DIR outside it" in err and "loading" not in err, err
        assert files_state(setup.root) == before


def test_force_through_a_symlink_replaces_the_folder_it_points_to(setup):
    target = setup.root / "target"
    setup.out.rename(target)
    setup.out.symlink_to(target)
    assert setup.merge("new") == 0
    assert setup.out.is_symlink() and os.readlink(setup.out) == str(target)
    assert setup.holds(target) == "new"
    assert sorted(os.listdir(setup.root)) == sorted([*setup.listing, "target"])


@pytest.mark.parametrize("began", ["was empty", "did not exist"])
def test_without_force_files_written_into_the_empty_out_dir_meanwhile_are_kept(setup, monkeypatch, capsys, began):
    """OUT_DIR was empty (or absent) when the merge began (so no --force), and another program wrote into it
    while the model was merged: the merge refuses at the swap and OUT_DIR keeps that file; nothing is deleted."""
    shutil.rmtree(setup.out)
    if began == "was empty":
        setup.out.mkdir()
    real = transformers.PreTrainedModel.save_pretrained

    def with_a_writer_meanwhile(self, directory, *args, **kwargs):
        setup.out.mkdir(exist_ok=True)
        (setup.out / "written-meanwhile.txt").write_text("someone else's")
        return real(self, directory, *args, **kwargs)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", with_a_writer_meanwhile)
    assert setup.merge("new", force=False) == cli.ERROR_EXIT
    monkeypatch.undo()
    assert f"{began} when this began, and files were written into it meanwhile: they are kept" in capsys.readouterr().err
    assert sorted(os.listdir(setup.out)) == ["written-meanwhile.txt"]
    assert sorted(os.listdir(setup.root)) == setup.listing  # the merged model's temporary folder removed


def test_an_undo_that_fails_because_another_folder_took_the_place_says_so(setup, monkeypatch, capsys):
    """The merged model cannot be renamed in and the old folder cannot go back because another process put
    a folder at OUT_DIR meanwhile: the message must not say OUT_DIR is absent."""
    real = os.rename

    def another_process_wins(source, target, *args, **kwargs):
        if Path(source).name.endswith(TEMP_SUFFIX):  # the merged model's rename into OUT_DIR
            Path(target).mkdir()
            (Path(target) / "theirs.txt").write_text("another merge")
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(target))
        return real(source, target, *args, **kwargs)
    monkeypatch.setattr(os, "rename", another_process_wins)
    assert setup.merge("new") == cli.ERROR_EXIT
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "now holds a folder that another process put there" in err and "is now absent" not in err, err
    assert sorted(os.listdir(setup.out)) == ["theirs.txt"]
    assert setup.holds(next(setup.root.glob(f".out.*{OLD_SUFFIX}"))) == "old"


def test_a_mount_point_out_dir_is_refused_before_loading(setup, monkeypatch, capsys):
    """A mount point cannot be renamed: refused before the model is loaded, with a folder inside it offered."""
    target = os.path.realpath(setup.out)
    monkeypatch.setattr(os.path, "ismount", lambda path: os.path.realpath(path) == target)
    monkeypatch.setattr(cli, "open_model", lambda *args: pytest.fail("loaded the model before refusing"))
    assert setup.merge("new") == cli.ERROR_EXIT
    assert "is a mount point" in capsys.readouterr().err
    assert setup.holds(setup.out) == "old"


def test_the_replaced_folder_keeps_its_permissions(setup):
    os.chmod(setup.out, 0o750)
    assert setup.merge("new") == 0
    assert setup.out.stat().st_mode & 0o7777 == 0o750

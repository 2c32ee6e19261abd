"""Writing an adapter's two files so that a crash never leaves a mix of two saves.

An adapter is two files, ``adapter_config.json`` (r, lora_alpha, targets, ...) and the weights
(A and B). They must come from the same save: new weights read with an old config would load
without error at the wrong ``scaling = lora_alpha / r``. Two rules make every state on disk load as
one whole save: the old or the new one, whatever instant a process is killed at; with several
processes writing into one directory at once, one whole save or a clear error:

1. Each file is written whole or not at all: its bytes go to a fresh temporary file in the same
   directory, which is flushed to disk and then renamed over the old name (``os.replace``: atomic
   on POSIX and Windows). A reader sees the old file or the new one, never a part. The rename
   replaces a symlink planted at that name; it never writes through it. Both files of a save are
   written out before either is renamed (``stage``, then ``commit``), so a write that fails (a full
   disk, a permission) leaves the directory as it was.
2. The pair is bound: the weights file records a digest of the config fields it was saved with
   (``config_digest``), the whole config text, and the digest of the config it replaces (the one
   in the directory when the save began), in the safetensors metadata (PEFT ignores it) or in the
   ``.bin`` dict's ``_metadata``. The weights are written first, the config second, so between the
   two renames a reader finds the new weights next to the config they replace: it reads them with
   the config they carry (``config_for_weights``), and gets the new adapter whole. Before the first
   rename it gets the old adapter, after the second the new one: never a mix, and never an error
   for a directory that held a whole adapter. A config that is neither (another writer's, arriving
   in between, or one edited by hand) is refused by ``load_adapter``. Files without a digest
   (written by PEFT) are read as they are.

A temporary file that a killed process left behind has a name no reader looks at, ``.NAME.PID.
RANDOM.minilora-tmp``; the next save removes those whose process is gone.

A whole folder (``minilora merge``'s OUT_DIR, a saved transformers model) is replaced the same way, one
level up (``replaced_folder``): written as a temporary folder next to it, then swapped in by renames.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".minilora-tmp"
OLD_SUFFIX = ".minilora-old"  # a replaced folder, renamed aside until the new one is in (replaced_folder)
# In the safetensors metadata, or the .bin dict's _metadata (strings, as safetensors requires):
DIGEST_KEY = "minilora_config_sha256"  # the config the weights were saved with
CONFIG_KEY = "minilora_config"  # ... that config's text, as adapter_config.json holds it
REPLACES_KEY = "minilora_replaces_config_sha256"  # the config that was in the directory when the save began


def config_digest(fields: Mapping[str, Any], digested_fields: tuple[str, ...]) -> str:
    """sha256 of the config fields that decide what the adapter computes, in a canonical JSON form.

    Only these fields are bound to the weights, so that editing a field that says where the adapter
    came from (``base_model_name_or_path``, ``task_type``) by hand keeps the files loadable.
    """
    chosen = {name: fields[name] for name in digested_fields if name in fields}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode("utf-8")).hexdigest()


def weights_metadata(fields: Mapping[str, Any], text: str, replaced: Mapping[str, Any] | None,
                     digested_fields: tuple[str, ...]) -> dict[str, str]:
    """What a save records in the weights file about its config: its digest and text, and the digest
    of ``replaced``, the config the directory held when the save began (None: none, or unreadable)."""
    metadata = {DIGEST_KEY: config_digest(fields, digested_fields), CONFIG_KEY: text}
    if replaced is not None:
        metadata[REPLACES_KEY] = config_digest(replaced, digested_fields)
    return metadata


def config_for_weights(file_fields: Mapping[str, Any], metadata: Mapping[str, Any] | None,
                       digested_fields: tuple[str, ...]) -> Mapping[str, Any] | None:
    """The config fields to read the weights with, given the config file's ``file_fields`` and the
    weights' ``metadata``; None if the config file belongs to neither this save nor the one it replaced.

    - weights without a digest (PEFT's files): the config file, as it is;
    - the config file the weights were saved with: it;
    - the config file the weights' save replaced: that save stopped, or is still running, between
      writing the weights and writing the config; the weights carry their config: that one;
    - anything else (another save's config, or one edited by hand): None.
    """
    digest = metadata.get(DIGEST_KEY) if isinstance(metadata, Mapping) else None
    if not isinstance(digest, str):
        return file_fields
    found = config_digest(file_fields, digested_fields)
    if found == digest:
        return file_fields
    carried = metadata.get(CONFIG_KEY)
    if found == metadata.get(REPLACES_KEY) and isinstance(carried, str):
        try:
            fields = json.loads(carried)
        except (ValueError, RecursionError):
            return None
        if isinstance(fields, dict) and config_digest(fields, digested_fields) == digest:
            return fields
    return None


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``, in one step: readers see the old file or the new one.

    The new file gets the mode any new file gets here (0o666 less the umask), whatever the old one had.
    """
    temp = stage(path, data)
    try:
        commit(temp, path)
    except BaseException:
        discard([temp])
        raise


def stage(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file next to ``path``, flushed to disk, and return its path for
    ``commit``. Nothing a reader looks at changes; on failure (a full disk, ...) nothing is left behind.

    Staging every file of a save before committing any means that a write that fails leaves the
    directory as it was.
    """
    temp = _sibling(path, TEMP_SUFFIX)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(temp, flags, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def commit(temp: Path, path: Path) -> None:
    """Rename the staged file ``temp`` over ``path`` (atomic), and make the rename durable."""
    os.replace(temp, path)
    _sync_directory(path.parent)


def discard(temps: list[Path]) -> None:
    """Remove staged files that were not committed."""
    for temp in temps:
        temp.unlink(missing_ok=True)


def write_error_hint(error: OSError) -> str:
    """What to do about a failed write, for an error message (a save that fails changes nothing)."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "Free some space, or pass a directory on another disk; what was there before is unchanged."
    return "Pass a directory you can write to; what was there before is unchanged."


def remove_atomically(path: Path) -> None:
    """Remove ``path`` (a file or a symlink, never what a link points to) if it exists."""
    path.unlink(missing_ok=True)
    _sync_directory(path.parent)


def remove_abandoned_temporaries(directory: Path, folders: bool = False) -> None:
    """Remove the temporary files (with ``folders``, also folders) of saves whose process no longer
    runs (killed mid-save).

    With ``folders``, also the old folders that ``replaced_folder`` renamed aside, but only where the new
    folder took their place: one whose name is free again was left by a process killed between its two
    renames, and is the only copy of that folder (kept for its owner to rename back).
    """
    aside = directory.glob(f".*{OLD_SUFFIX}") if folders else ()
    for temp in [*directory.glob(f".*{TEMP_SUFFIX}"), *aside]:
        parts = temp.name.split(".")  # ['', NAME..., PID, RANDOM, 'minilora-tmp' or 'minilora-old']
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is None or pid == os.getpid() or _process_exists(pid):
            continue
        if temp.name.endswith(OLD_SUFFIX) and not (directory / ".".join(parts[1:-3])).exists():
            continue
        if temp.is_dir() and not temp.is_symlink():
            if folders:
                shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell: leave its file alone
    return True


def _sync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _sibling(path: Path, suffix: str) -> Path:
    """A hidden name next to ``path`` that no reader looks at: ``.NAME.PID.RANDOM<suffix>``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def replaced_folder(path: str | os.PathLike, what: str, replace: bool) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to ``path`` to write ``what`` into; once the block ends
    without an error, that folder takes ``path``'s place whole. After a crash or an error at any instant,
    ``path`` holds its old contents or the new ones, never a mix (a new config.json next to old weights
    loads as neither model):

    1. the block writes into ``.NAME.PID.RANDOM.minilora-tmp``; its files are flushed to disk;
    2. with ``replace``, an existing ``path`` (empty or not) is renamed aside, to
       ``.NAME.PID.RANDOM.minilora-old``; without, nothing is (``path`` must be absent or empty);
    3. the new folder is renamed to ``path`` (onto an empty folder, which POSIX's rename replaces; one
       that something wrote into meanwhile makes it fail, and its files are kept: a MiniLoraError);
    4. the old one is removed.

    An error in 1 or 2 leaves ``path`` as it was; in 3, the old folder is renamed back, and if even that
    fails the MiniLoraError says where each one is. Only a process killed between 2 and 3 (two system
    calls apart) leaves no ``path``; its old contents are then in the ``-old`` folder, kept until a later
    call puts a folder at ``path`` again. The next call in the same parent removes what killed processes
    left behind (``remove_abandoned_temporaries``). A symlink to a folder stays a link: the folder it
    points to is replaced.
    """
    from .config import MiniLoraError

    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(path.parent, folders=True)
    temp = _sibling(path, TEMP_SUFFIX)
    existed = path.is_dir()  # (for the message, should files appear at ``path`` meanwhile)
    temp.mkdir()
    try:
        yield temp
        _sync_tree(temp)  # the files on disk before a rename makes them the folder
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError):
            raise MiniLoraError(f"Could not write {what} to {path}: {error}. {write_error_hint(error)}") from error
        raise
    old = _sibling(path, OLD_SUFFIX) if replace and path.is_dir() else None
    try:
        if path.is_dir():
            with contextlib.suppress(OSError):  # the folder keeps its permissions, where they can be copied
                os.chmod(temp, path.stat().st_mode & 0o7777)
        if old is not None:
            os.rename(path, old)
        os.rename(temp, path)  # (fails, rather than mixing, if a folder with files appeared at ``path`` meanwhile)
    except BaseException as error:
        if old is not None and old.exists() and not _renamed(old, path):
            now = (f"{path} now holds a folder that another process put there" if path.exists()
                   else f"{path} is now absent")
            raise MiniLoraError(f"Could not move {what} into {path}: {error}. {now}: its old contents are in {old}, "
                                f"and {what} is in {temp}. Rename one of them to {path}.") from error
        shutil.rmtree(temp, ignore_errors=True)
        if not replace and isinstance(error, OSError) and error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            began = "was empty" if existed else "did not exist"
            raise MiniLoraError(f"{path} {began} when this began, and files were written into it meanwhile: they "
                                f"are kept, and {what} was not saved. Pass a new directory (or --force to replace "
                                "it).") from error
        if isinstance(error, OSError):
            raise MiniLoraError(f"Could not move {what} into {path}: {error}. {write_error_hint(error)}") from error
        raise
    _sync_directory(path.parent)  # the renames are durable
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            warnings.warn(f"{what} is in {path}, but its old contents, renamed to {old}, could not all be removed. "
                          "Remove that folder by hand.", stacklevel=3)
    remove_abandoned_temporaries(path.parent, folders=True)  # (an -old folder kept because ``path`` was absent)


def _renamed(source: Path, target: Path) -> bool:
    """Rename ``source`` to ``target``; whether that worked (an undo, which must not raise)."""
    try:
        os.rename(source, target)
    except OSError:
        return False
    return True


def _sync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders: after a power loss, the renamed folder
    holds complete files, not empty or truncated ones."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _sync_directory(Path(root))


def check_writable(path: str | os.PathLike, what: str, directory: bool = False, parents: bool = False) -> None:
    """Raise MiniLoraError now, before a long run, if ``path`` (a file, or with ``directory`` a folder)
    could not be written. Creates nothing: a missing folder that the writer will create (``directory``,
    or ``parents`` for a file's folders) is judged by its nearest existing parent."""
    from .config import MiniLoraError

    problem = write_problem(path, directory, parents)
    if problem:
        raise MiniLoraError(f"{what} {str(path)!r} cannot be written ({problem}). Pass a path in a directory you "
                            "can write to.")


def write_problem(path: str | os.PathLike, directory: bool = False, parents: bool = False) -> str | None:
    """Why ``path`` could not be written (``check_writable``'s probe), or None if it can."""
    path = Path(path).expanduser()
    if not directory and path.is_dir():
        return "it is a directory"
    if directory and path.exists() and not path.is_dir():
        return "it is a file"
    folder = path if directory else path.parent
    while (directory or parents) and not folder.exists() and folder != folder.parent:
        folder = folder.parent  # save_pretrained / mkdir create the missing ones
    if not folder.is_dir():
        return f"{folder} is not a directory" if folder.exists() else f"directory {folder} does not exist"
    probe = folder / f".write-test.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        return error.strerror or str(error)
    return None

"""One isolated virtual environment per PEFT release, for the version matrix.

Each environment gets its own PEFT, a transformers release from the same months (old PEFT
releases break on new transformers and vice versa) and the matching accelerate / huggingface_hub.
torch is NOT installed again: it is big, and the point of the matrix is to vary PEFT, not torch.
Instead the environment sees this machine's torch through a ``.pth`` file that points at a folder
of links to torch and its own dependencies only. Entries of a ``.pth`` file go on ``sys.path``
after the environment's site-packages, so the environment's own packages always win, and pip sees
torch as installed and does not fetch another.

Environments are cached under ``.parity-envs/`` (git-ignored): a finished one holds a ``ready.json``
with the versions actually installed, and is reused as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVS_ROOT = REPO_ROOT / ".parity-envs"
READY_FILE = "ready.json"

# PEFT release -> the other packages pinned beside it: transformers, accelerate and huggingface_hub
# releases from the same months, so that each PEFT runs against the libraries it was tested with.
# numpy<2 where transformers predates numpy 2's release (June 2024).
COMPANIONS: dict[str, list[str]] = {
    "0.3.0": ["transformers==4.28.1", "accelerate==0.18.0", "huggingface_hub==0.14.1", "numpy<2",
              "setuptools>=77.0.3,<81"],  # accelerate 0.18 imports pkg_resources; torch needs >=77.0.3
    "0.4.0": ["transformers==4.31.0", "accelerate==0.21.0", "huggingface_hub==0.16.4", "numpy<2"],
    "0.5.0": ["transformers==4.33.3", "accelerate==0.23.0", "huggingface_hub==0.17.3", "numpy<2"],
    "0.6.2": ["transformers==4.35.2", "accelerate==0.24.1", "huggingface_hub==0.19.4", "numpy<2"],
    "0.7.1": ["transformers==4.36.2", "accelerate==0.25.0", "huggingface_hub==0.20.1", "numpy<2"],
    "0.8.2": ["transformers==4.37.2", "accelerate==0.26.1", "huggingface_hub==0.20.3", "numpy<2"],
    "0.9.0": ["transformers==4.38.2", "accelerate==0.27.2", "huggingface_hub==0.21.4", "numpy<2"],
    "0.10.0": ["transformers==4.39.3", "accelerate==0.28.0", "huggingface_hub==0.22.2", "numpy<2"],
    "0.11.1": ["transformers==4.41.2", "accelerate==0.30.1", "huggingface_hub==0.23.4", "numpy<2"],
    "0.12.0": ["transformers==4.43.4", "accelerate==0.33.0", "huggingface_hub==0.24.5"],
    "0.13.2": ["transformers==4.46.3", "accelerate==1.1.1", "huggingface_hub==0.26.5"],
    "0.14.0": ["transformers==4.47.1", "accelerate==1.2.1", "huggingface_hub==0.27.0"],
    "0.15.2": ["transformers==4.51.3", "accelerate==1.6.0", "huggingface_hub==0.30.2"],
    "0.16.0": ["transformers==4.52.4", "accelerate==1.7.0", "huggingface_hub==0.32.4"],
    "0.17.1": ["transformers==4.55.4", "accelerate==1.10.0", "huggingface_hub==0.34.4"],
    "0.18.1": ["transformers==4.57.3", "accelerate==1.12.0", "huggingface_hub==0.36.2"],  # 4.x needs hub<1
    "0.19.1": ["transformers==5.5.4", "accelerate==1.13.0", "huggingface_hub==1.11.0"],
    "0.20.0": ["transformers==5.14.1", "accelerate==1.14.0", "huggingface_hub==1.25.1"],
    "0.21.2": ["transformers==5.24.0", "accelerate==1.15.0", "huggingface_hub==2.4.0"],  # this venv's set
}

# What minilora itself imports beyond torch, transformers and PEFT (transformers before 4.30 lacks it).
MINILORA_NEEDS = ("safetensors",)

# The distributions torch itself needs at run time; only these are linked into each environment.
TORCH_DISTRIBUTIONS = ("torch", "filelock", "typing_extensions", "sympy", "mpmath", "networkx",
                       "jinja2", "markupsafe", "fsspec")


class EnvError(RuntimeError):
    """An environment could not be built; the message says which step failed and where its log is."""


def shown(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it (what the page and the JSON record)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def env_dir(version: str, root: Path = ENVS_ROOT) -> Path:
    return root / f"peft-{version}"


def env_python(version: str, root: Path = ENVS_ROOT) -> Path:
    return env_dir(version, root) / "bin" / "python"


def requirements(version: str) -> list[str]:
    """What pip installs into the environment of PEFT ``version``.

    Raises:
        EnvError: for a release with no companion pins (add a line to COMPANIONS).
    """
    if version not in COMPANIONS:
        raise EnvError(
            f"No transformers release is pinned for peft {version}. Known: {', '.join(COMPANIONS)}. "
            "Add a line to parity.envs.COMPANIONS with a transformers release of the same months."
        )
    return [f"peft=={version}", *COMPANIONS[version], *MINILORA_NEEDS]


def torch_link_dir(root: Path = ENVS_ROOT) -> Path:
    """A folder of symlinks to this interpreter's torch and its dependencies (and their dist-info).

    Built once and shared by all environments: linking is instant, copying torch is ~750 MB each.
    """
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    links = root / "_torch-site"
    if (links / "torch").exists():
        return links
    links.mkdir(parents=True, exist_ok=True)
    wanted = {name.lower() for name in TORCH_DISTRIBUTIONS}
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].lower().removesuffix(".py")
        if stem in wanted or entry.name in ("functorch", "torchgen", "isympy.py"):
            target = links / entry.name
            if not target.exists():
                target.symlink_to(entry)
    return links


def build_env(version: str, root: Path = ENVS_ROOT, log: Callable[[str], None] = print) -> Path:
    """The Python of a ready environment for PEFT ``version``, building it if it is not cached.

    Raises:
        EnvError: if pip fails (its output is kept in ``<env>/build.log``).
    """
    directory = env_dir(version, root)
    python = env_python(version, root)
    if (directory / READY_FILE).exists():
        return python
    packages = requirements(version)
    if directory.exists():
        shutil.rmtree(directory)  # a half-built environment from an interrupted run
    log(f"building {directory.name}: {' '.join(packages)}")
    venv.EnvBuilder(with_pip=True).create(directory)
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "zz_parity_torch.pth").write_text(f"{torch_link_dir(root)}\n")
    build_log = directory / "build.log"
    with build_log.open("w") as out:
        done = subprocess.run(
            # --no-compile: byte-compiling all of transformers is most of an install's CPU time; Python
            # compiles the few modules a run imports on first use
            [str(python), "-m", "pip", "install", "--no-input", "--no-compile",
             "--constraint", str(_torch_pin(directory)), *packages],
            stdout=out, stderr=subprocess.STDOUT, env=_pip_env(),
        )
    if done.returncode != 0:
        errors = [line for line in build_log.read_text().splitlines() if line.startswith("ERROR:")]
        why = f": {errors[0].removeprefix('ERROR: ')[:300]}" if errors else ""
        raise EnvError(f"pip install {' '.join(packages)} failed for peft {version}{why}; see {shown(build_log)}")
    done = subprocess.run([str(python), "-c", VERSIONS_SNIPPET], capture_output=True, text=True, env=_pip_env())
    if done.returncode != 0:
        with build_log.open("a") as out:
            out.write(done.stderr)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvError(f"peft {version} installed but does not import: {last[:200]}; see {shown(build_log)}")
    versions = json.loads(done.stdout)
    (directory / READY_FILE).write_text(json.dumps(versions, indent=2) + "\n")
    log(f"built {directory.name}: {versions}")
    return python


def _torch_pin(directory: Path) -> Path:
    """A pip constraints file holding this machine's torch version, so that a requirement torch cannot
    meet makes pip fail (a clear build error) instead of downloading another torch with CUDA (GBs)."""
    import torch

    pin = directory / "torch-constraint.txt"
    pin.write_text(f"torch=={torch.__version__}\n")
    return pin


VERSIONS_SNIPPET = (
    "import json, torch, transformers, peft; "
    "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
    "'peft': peft.__version__}))"
)


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the environment must not see this checkout while pip resolves
    return env


def main(argv: list[str] | None = None) -> int:
    """``python -m parity.envs 0.6.2 0.8.2 ...`` (or ``all``): build (or reuse) environments, one at a time."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m parity.envs",
        description="Build (or reuse) the cached virtual environment of each PEFT release, one at a time "
                    "(about a minute each on 2 cores, ~170 MB each; torch is linked, not installed). "
                    "`python -m parity matrix` builds what it needs by itself: this only prepares them.",
        epilog="known releases: " + ", ".join(COMPANIONS))
    parser.add_argument("versions", nargs="+", metavar="VERSION", help="PEFT releases, or 'all'")
    parser.add_argument("--root", default=str(ENVS_ROOT), help="where environments live (default: .parity-envs/)")
    args = parser.parse_args(argv)
    versions = list(COMPANIONS) if args.versions == ["all"] else args.versions
    failed = 0
    for version in versions:
        try:
            build_env(version, Path(args.root))
        except EnvError as error:
            print(f"FAILED {version}: {error}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

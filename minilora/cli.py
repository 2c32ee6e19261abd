"""The ``minilora`` command: look at what LoRA does to a model.

    minilora inspect [--model M] [--r 8] [--alpha 32] [--targets c_attn ...]
    minilora merge ADAPTER_DIR OUT_DIR [--model M]
    minilora diff ADAPTER_DIR [--model M] [--plot FILE.png]

Every subcommand runs on the embedded random GPT-2 small by default (``minilora.load_model()``);
``--model`` takes a hub name (``gpt2``, if it is in your Hugging Face cache) or a local directory
with real weights. A mistake in the input (a missing directory, an adapter made for another model)
prints one ``minilora: error: ...`` line that says what to do, and exits with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

from .config import LoraConfig, MiniLoraError
from .files import check_writable, replaced_folder, write_problem
from .inject import inject, lora_layers, merge_and_unload
from .models import DEFAULT_MODEL, load_model
from .params import layer_table, trainable_parameters_line

MODEL_HELP = (
    "the base model: a hub name (e.g. gpt2, from your Hugging Face cache) or a local directory with "
    "config.json and weights, loaded as the class its config names (config.architectures) "
    "(default: the embedded random GPT-2 small, seed 0)"
)
ERROR_EXIT = 2  # argparse's own status for bad usage


def progress(message: str) -> None:
    """Progress lines go to stderr, so stdout holds only the result (tables can be piped)."""
    print(message, file=sys.stderr, flush=True)


def open_model(name_or_path: str | None):
    """``load_model`` with the CLI's checks: a directory without config.json is named as such."""
    if name_or_path not in (None, DEFAULT_MODEL) and os.path.isdir(name_or_path) \
            and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise MiniLoraError(
            f"--model {name_or_path!r} is a directory without config.json, so it is not a saved model. "
            "Point it at the directory that save_pretrained wrote (or that `minilora merge` wrote)."
        )
    progress(f"loading model: {name_or_path or 'embedded random GPT-2 small (seed 0)'}")
    try:
        return load_model(name_or_path)
    except MiniLoraError:
        raise
    except (OSError, ValueError) as error:  # e.g. a config.json transformers cannot read
        raise MiniLoraError(f"Could not load model {name_or_path!r}: {error}") from error


def check_adapter_dir(path: str) -> None:
    """Fail early (before the model is loaded) when ADAPTER_DIR cannot be an adapter."""
    if not os.path.exists(path):
        raise MiniLoraError(f"adapter directory {path!r} does not exist. Pass the directory that "
                            "save_adapter (or PEFT's save_pretrained) wrote.")
    if not os.path.isdir(path):
        raise MiniLoraError(f"{path!r} is a file; ADAPTER_DIR is the directory that holds "
                            "adapter_config.json and adapter_model.safetensors.")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise MiniLoraError(f"{path!r} has no adapter_config.json, so it is not a saved adapter "
                            f"(it holds: {sorted(os.listdir(path))[:8]}).")


def note_adapter_base(adapter_dir: str, model_arg: str | None) -> None:
    """Say so when the adapter names a base model other than the one we are about to use."""
    from .adapter_config import read_json_fields

    try:  # (a bounded read: a config of gigabytes is load_adapter's to refuse, not a MemoryError here)
        base = read_json_fields(Path(adapter_dir, "adapter_config.json")).get("base_model_name_or_path")
    except MiniLoraError:
        return  # load_adapter reports a broken config with the details
    if base and model_arg is None and base not in (DEFAULT_MODEL,):
        progress(f"warning: the adapter was saved from base model {base!r}, but --model is not given: using "
                 f"the embedded random GPT-2. Pass --model {base} to use the adapter's own base model.")


def load_adapted(adapter_dir: str, model_arg: str | None):
    """The base model with the adapter loaded into it (all checks before any loading)."""
    from .adapter_files import read_adapter_files
    from .adapters import load_adapter

    check_adapter_dir(adapter_dir)
    note_adapter_base(adapter_dir, model_arg)
    model = open_model(model_arg)
    progress(f"loading adapter: {adapter_dir}")
    files = read_adapter_files(Path(adapter_dir))  # once: the resize and the load read one version
    resize_to_adapter_vocabulary(model, files.tensors)
    load_adapter(model, files)
    return model


def resize_to_adapter_vocabulary(model, tensors: dict) -> None:
    """Resize the base model's vocabulary to the adapter's, where the adapter's ``tensors`` hold the resized
    embedding layers whole (PEFT's ``save_embedding_layers``, after ``resize_token_embeddings``).

    In Python, a user loading such an adapter first calls ``model.resize_token_embeddings(n)`` on the
    base model, as PEFT requires; the command does it for them. Only where the file holds every
    embedding weight that resizing would leave new random rows in (the input embedding, and an
    untied output embedding): loading then overwrites every row. Otherwise nothing is resized, and
    load_adapter refuses the mismatched shapes with the details.
    """
    from .adapter_files import PEFT_PREFIX

    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()] \
        if hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings") else []
    if not embeddings or embeddings[0] is None:
        return
    if embeddings[1] is None or embeddings[1].weight is embeddings[0].weight:
        embeddings = embeddings[:1]  # no output embedding, or tied to the input one: one weight to fill
    names = {id(module): name for name, module in model.named_modules()}
    rows = set()
    for module in embeddings:
        prefix = f"{PEFT_PREFIX}{names.get(id(module))}."
        found = [value for key, value in tensors.items() if key.startswith(prefix) and "lora_" not in key
                 and key[len(prefix):] in ("weight", "base_layer.weight", "original_module.weight")]
        if not found or any(value.dim() != 2 or value.shape[1] != module.weight.shape[1] for value in found):
            return  # this weight is not in the file whole: resizing would leave random rows
        rows.update(value.shape[0] for value in found)
    current = embeddings[0].weight.shape[0]
    if len(rows) == 1 and (size := rows.pop()) != current:
        progress(f"resizing the base model's vocabulary {current} -> {size}: the adapter was saved with resized "
                 "embedding layers (model.resize_token_embeddings)")
        resize = model.resize_token_embeddings
        if "mean_resizing" in inspect.signature(resize).parameters:  # (transformers >= 4.46)
            resize(size, mean_resizing=False)  # (no mean/covariance of the old rows: every row is overwritten)
        else:
            resize(size)


# --------------------------------------------------------------------------------------------
# The subcommands
# --------------------------------------------------------------------------------------------
def run_inspect(args: argparse.Namespace) -> None:
    """Inject LoRA with the given numbers and print what it adds, layer by layer."""
    targets = args.targets
    if targets and len(targets) == 1 and targets[0].lower() == "all-linear":
        targets = "all-linear"  # PEFT's shorthand is a string, not a list entry
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets)
    model = open_model(args.model)
    inject(model, config)
    print(layer_table(model))
    print()
    print(trainable_parameters_line(model))


def run_merge(args: argparse.Namespace) -> None:
    """Fold the adapter into W0 and save a plain transformers model."""
    out_dir = args.out_dir
    check_merge_out_dir(out_dir, args)
    model = load_adapted(args.adapter_dir, args.model)
    layers = len(list(lora_layers(model)))
    progress(f"merging {layers} LoRA layers: W0 <- W0 + scaling * B A")
    merge_and_unload(model, safe=True)
    progress(f"saving: {out_dir}")
    with replaced_folder(out_dir, "the merged model", replace=args.force) as writing_dir:  # OUT_DIR: all old or all new (files.py)
        model.save_pretrained(writing_dir)
        save_tokenizer_if_any(model, args.model, writing_dir)
    print(f"Merged {layers} LoRA layers into the base model and saved it to {out_dir}.")
    print(f"It is a plain transformers model: {type(model).__name__}.from_pretrained({out_dir!r}).")


def check_merge_out_dir(out_dir: str, args: argparse.Namespace) -> None:
    """Raise MiniLoraError, before any work, if merge could not (or must not) replace ``out_dir``.

    The merged model is written into a temporary folder next to OUT_DIR (next to the folder it links to,
    for a symlink), which then takes OUT_DIR's place (``replaced_folder``): that parent must be writable,
    and with --force OUT_DIR's old files go, so it must not hold the adapter, the base model or the current
    directory (which would be left as a removed folder).
    """
    if os.path.isfile(out_dir):
        raise MiniLoraError(f"OUT_DIR {out_dir!r} is a file. Pass a new or empty directory.")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        raise MiniLoraError(f"OUT_DIR {out_dir!r} is a symlink to nothing ({os.readlink(out_dir)!r}). Pass a new or "
                            "empty directory, or make the folder the link points to first.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not args.force:
        raise MiniLoraError(f"OUT_DIR {out_dir!r} already exists and is not empty. Pass a new directory, "
                            "or --force to replace it (its files are removed once the merged model is complete).")
    target = os.path.realpath(out_dir)
    if os.path.isdir(target) and os.path.ismount(target):  # (ismount: another device than its parent's, or /)
        raise MiniLoraError(f"OUT_DIR {out_dir!r} is a mount point: the merged model is written next to it and then "
                            "renamed into its place, which a mount point cannot take. Pass a folder inside it, e.g. "
                            f"{os.path.join(out_dir, 'merged')!r}.")
    for what, path in (("ADAPTER_DIR", args.adapter_dir), ("--model", args.model), ("the current directory", ".")):
        if path is not None and os.path.exists(path) and _inside(os.path.realpath(path), target):
            raise MiniLoraError(f"OUT_DIR {out_dir!r} holds {what} {path!r}, and merging replaces OUT_DIR with all it "
                                "holds. Pass an OUT_DIR outside it.")
    parent = os.path.dirname(target)
    problem = write_problem(parent, directory=True)
    if problem:
        raise MiniLoraError(f"OUT_DIR {out_dir!r} cannot be written: the merged model is written into a temporary "
                            f"folder in {parent!r}, then renamed to OUT_DIR, and that folder cannot be written "
                            f"({problem}). Pass an OUT_DIR in a directory you can write to.")


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved)."""
    return os.path.commonpath([path, folder]) == folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def save_tokenizer_if_any(model, model_arg: str | None, out_dir: str) -> None:
    """Copy the base model's tokenizer next to the merged weights, when it has one."""
    if model_arg in (None, DEFAULT_MODEL):
        return  # the embedded model has no tokenizer of its own (see minilora/text.py)
    source = getattr(model, "name_or_path", None) or model_arg  # where the weights came from (a cache dir offline)
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES):
        progress(f"note: no tokenizer saved ({source} has no tokenizer files)")
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
    except (OSError, ValueError) as error:
        progress(f"note: no tokenizer saved ({str(error).splitlines()[0]})")


def run_diff(args: argparse.Namespace) -> None:
    """Per layer: how large dW is next to W0, and its rank."""
    from .spectrum import change_table, layer_changes, plot_changes

    if args.plot and not args.plot.lower().endswith(".png"):
        raise MiniLoraError(f"--plot writes a PNG; give it a file name ending in .png, not {args.plot!r}.")
    if not 0 < args.rtol < 1:
        raise MiniLoraError(f"--rtol must be between 0 and 1, got {args.rtol}. The default is 0.01.")
    if args.plot:
        check_writable(args.plot, "--plot")
    model = load_adapted(args.adapter_dir, args.model)
    rows = layer_changes(model, rtol=args.rtol)
    print(change_table(rows))
    if args.plot:
        try:
            plot_changes(rows, args.plot)
        except ImportError as error:
            raise MiniLoraError(f"--plot needs matplotlib ({error}). Install it: pip install 'minilora[plot]'.")
        print(f"\nplot saved to {args.plot}")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
DIFF_EPILOG = """\
columns:
  ||dW||_F / ||W0||_F  size of the update dW = (alpha / r) B A next to the frozen weight W0
                       (Frobenius norms)
  rank                 number of singular values s_i of dW with s_i > RTOL * s_1 (s_1 the largest)
  eff. rank            Roy & Vetterli's effective rank exp(-sum p_i log p_i), p_i = s_i / sum_j s_j:
                       k for k equal singular values, towards 1 when one direction dominates;
                       0 for dW = 0 (an untrained adapter, B = 0)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect_parser = commands.add_parser(
        "inspect", help="which layers LoRA wraps and how many parameters it adds",
        description="Inject LoRA into the model and print, per wrapped layer: its kind (Linear, or GPT-2's\n"
                    "Conv1D), in and out features, r, and the parameters it adds, by the formula r * (in + out)\n"
                    "and by counting; then the totals line in PEFT's format.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect_parser.add_argument("--model", default=None, help=MODEL_HELP)
    inspect_parser.add_argument("--r", type=int, default=8, help="rank of the update B A (default: 8)")
    inspect_parser.add_argument("--alpha", type=float, default=32,
                                help="lora_alpha; the update is scaled by alpha / r (default: 32)")
    inspect_parser.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                                help="modules to wrap, by name or last name part, or all-linear (every "
                                     "linear layer but the output layer) (default: PEFT's for the "
                                     "architecture, c_attn for GPT-2)")
    inspect_parser.set_defaults(run=run_inspect)

    merge_parser = commands.add_parser(
        "merge", help="fold an adapter into the base model and save a plain transformers model",
        description="Load the base model, load the adapter in ADAPTER_DIR (saved by minilora.save_adapter or\n"
                    "by PEFT's save_pretrained), fold it in (W0 <- W0 + (alpha / r) B A) and save the result to\n"
                    "OUT_DIR with save_pretrained, as the class --model was loaded as (its config.json's\n"
                    "architectures). The saved model needs neither minilora nor PEFT:\n"
                    "AutoModelForCausalLM.from_pretrained(OUT_DIR) for GPT-2, the same class for any other.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    merge_parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory with adapter_config.json")
    merge_parser.add_argument("out_dir", metavar="OUT_DIR", help="where to save the merged model (new or empty; "
                                                                                     "see --force)")
    merge_parser.add_argument("--model", default=None, help=MODEL_HELP)
    merge_parser.add_argument("--force", action="store_true", help="replace OUT_DIR even if it is not empty (its old files are "
                                                                     "removed once the merged model is complete)")
    merge_parser.set_defaults(run=run_merge)

    diff_parser = commands.add_parser(
        "diff", help="per layer: the size and rank of the update dW an adapter makes",
        description="Load the adapter in ADAPTER_DIR into the base model and print, for each LoRA layer, how\n"
                    "large its update dW is next to the frozen weight W0, and how many directions it uses.",
        epilog=DIFF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    diff_parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory with adapter_config.json")
    diff_parser.add_argument("--model", default=None, help=MODEL_HELP)
    diff_parser.add_argument("--rtol", type=float, default=0.01,
                             help="relative threshold for the rank column (default: 0.01)")
    diff_parser.add_argument("--plot", metavar="FILE.png", default=None,
                             help="also save a bar chart of both columns per layer (needs matplotlib)")
    diff_parser.set_defaults(run=run_diff)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit status (0, or 2 for a user mistake, after one error line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except MiniLoraError as error:
        print(f"minilora: error: {error}", file=sys.stderr)
        return ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())

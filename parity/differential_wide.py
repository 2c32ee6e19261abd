"""The differential fuzzer's wider draws (parity/differential.py): more of PEFT's config fields and calls.

They come from a ``Draw`` of their own (in the CLI ``random.Random(f"{seed}/{index}")`` per example), so
the scenario parity/differential.py draws for a seed and index is the one it drew before they existed;
``python -m parity.differential --narrow`` runs those alone (a replay of an older finding). What is drawn
here is the scenario's ``wide`` dict:

    config              fields added to the first adapter's LoraConfig: lora_bias; rank_pattern /
                        alpha_pattern with regex keys (a layer index, a full name), use_rslora with a
                        rank_pattern; layers_to_transform with layers_pattern variants (a list, an unknown
                        name, a regex or "all-linear" target, which PEFT refuses); target_modules as a
                        suffix list with the task head in modules_to_save, or one full name as a string;
                        exclude_modules as full names or a regex over a layer index
    second              a second adapter's config, where the scenario has none
    merge_names         merge_adapter(adapter_names=[...]) of one or both of two adapters, forward,
                        unmerge_adapter(), forward
    multi_active        base_model.set_adapter([both]) (PEFT's LoraModel takes a list; its PeftModel
                        does not): structure, forward, backward, an AdamW step, PeftModel.active_adapters
    base_set_adapter    base_model.set_adapter(one name) or PeftModel's, with inference_mode True / False
    save_merged         merge_adapter(), save_pretrained while merged (the files), unmerge_adapter()
    selected_adapters   save_pretrained(selected_adapters=[...]) (the files)
    merge_enable        merge_adapter(), disable_adapter_layers(), enable_adapter_layers(): forwards after each
    train_step          an AdamW step before the save (so the files hold trained numbers)
    load                the save step's loads: from_pretrained(..., adapter_name=..., is_trainable=...) and
                        load_adapter of the *other* library's files (adapter_name=..., is_trainable=...; "same":
                        the saved adapter's own name, loading into it as Trainer's resume does), then set_adapter to it
    ending              after the scenario's last call: merge_and_unload(safe_merge=True, adapter_names=[...]),
                        unload(), get_base_model(), or model.to(float16 / bfloat16) then forward, backward,
                        merge / unmerge (1e-2 relative), save_pretrained
    dtype_start         a fresh pair built on a float16 / bfloat16 base with get_peft_model(...,
                        autocast_adapter_dtype=True / False): dtypes, values, forward, backward; the second
                        adapter (add_adapter with the same flag), merge_adapter / unmerge_adapter (1e-2
                        relative: half-precision sums), save_pretrained, from_pretrained into a half base
    adapter_name        get_peft_model(..., adapter_name=...) other than "default" (the rest of the
                        scenario uses it where it names the first adapter)
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from parity.architectures import Architecture

HEAD_NAMES = ("classifier", "score", "qa_outputs")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def draw_wide(draw, model: nn.Module, spec: Architecture, head: str, config: dict, second: Any) -> dict:
    """The wide part of a scenario (module docstring), drawn from ``draw`` only."""
    from parity.differential import draw_config, linear_names

    names = linear_names(model)
    suffixes = sorted({name.split(".")[-1] for name in names})
    indexed = [name for name in names if re.search(r"\.\d+\.", name)]
    wide: dict = {}
    fields: dict = {}
    if draw.boolean(0.15):
        fields["lora_bias"] = True
    if draw.boolean(0.25) and indexed:
        picked = draw.choice(indexed)
        key = draw.choice([re.escape(picked), rf"\d+\.{'.'.join(picked.split('.')[-2:])}",
                           rf".*\.0\..*{picked.split('.')[-1]}", picked.split(".")[-1] + "|" + suffixes[0]])
        fields[draw.choice(["rank_pattern", "alpha_pattern"])] = {key: draw.choice([2, 3, 6])}
        if "rank_pattern" in fields and draw.boolean():
            fields["use_rslora"] = True
    if draw.boolean(0.15) and "layers_to_transform" not in config:
        patterns = sorted({part for name in names for part, nxt in zip(name.split("."), name.split(".")[1:])
                           if nxt.isdigit()})
        fields["layers_to_transform"] = draw.choice([[0], 1, [1, 0]])
        fields["layers_pattern"] = draw.choice([patterns, "blocks", patterns[:1] + ["blocks"], None] if patterns
                                               else ["layers", None])
        if not isinstance(config.get("target_modules"), list) and draw.boolean(0.7):
            fields["target_modules"] = draw.subset(suffixes, most=2)
    if draw.boolean(0.15):
        heads = [name for name in HEAD_NAMES if hasattr(model, name)]
        fields["target_modules"] = draw.subset(suffixes, most=3)
        if heads:
            fields["modules_to_save"] = heads[:1]
    elif draw.boolean(0.1) and names:
        fields["target_modules"] = draw.choice(names)  # one full name, as a string: a regex fullmatch in PEFT
    if draw.boolean(0.15) and indexed:
        fields["exclude_modules"] = draw.choice([[draw.choice(indexed)], r".*\.1\..*", [indexed[0], "nothing"]])
    fields = {name: value for name, value in fields.items() if value is not None}
    if fields:
        wide["config"] = fields
    if second is None and draw.boolean(0.5):
        wide["second"] = draw_config(draw, model, spec, head, second=True)
    for name, p in (("merge_names", 0.4), ("multi_active", 0.4), ("base_set_adapter", 0.2), ("merge_enable", 0.3),
                    ("train_step", 0.3), ("save_merged", 0.2)):
        if draw.boolean(p):
            wide[name] = draw.choice([["default"], ["other"], ["default", "other"]]) if name == "merge_names" else True
    if wide.get("base_set_adapter"):
        wide["base_set_adapter"] = draw.choice([(True, False), (True, True), (False, True)])  # (base_model's, inference_mode)
    if draw.boolean(0.2):
        wide["selected_adapters"] = draw.choice([["default"], ["other"], ["default", "other"]])
    if draw.boolean(0.5):
        wide["load"] = dict(cross=draw.boolean(), is_trainable=draw.boolean(), name=draw.choice(["loaded", "same"]),
                            from_name=draw.choice(["default", "x"]))
    ending = draw.choice([None, "merge_and_unload", "unload", "get_base_model", "float16", "bfloat16"])
    if ending == "merge_and_unload":
        wide["ending"] = ("merge_and_unload", draw.choice([None, ["default"], ["other"], ["default", "other"]]))
    elif ending is not None:
        wide["ending"] = (ending, None)
    if draw.boolean(0.25):
        wide["dtype_start"] = (draw.choice(list(DTYPES)), draw.boolean())
    if draw.boolean(0.15):
        wide["adapter_name"] = draw.choice(["x", "lora"])
    return wide


def _named(wanted: list, model: nn.Module) -> list:
    """The drawn names, "default" being the first adapter's (get_peft_model's adapter_name), those the model has."""
    first = next(iter(model.peft_config))
    return [name for name in (first if name == "default" else name for name in wanted) if name in model.peft_config]


# --------------------------------------------------------------------------------------------
# Running the wide operations (parity/differential.py calls these at their places in a scenario)
# --------------------------------------------------------------------------------------------
def run_middle(wide: dict, mini: nn.Module, twin: nn.Module, inputs: dict) -> None:
    """The calls between the second adapter and the scenario's merge / disable / save steps. A call both
    refuse stops the scenario (PEFT may have changed part of the model before it raised)."""
    from parity.differential import (Finding, compare_backward, compare_forward, compare_structure,
                                     compare_train_step, run_both, trace)

    names = list(mini.peft_config)
    if wide.get("merge_names"):
        wanted = _named(wide["merge_names"], mini)
        if not wanted or len(names) < 2:
            trace().skipped("merge_adapter(adapter_names)", "the scenario has one adapter")
        else:
            _, _, ran = run_both(f"merge_adapter(adapter_names={wanted})",
                                 lambda: mini.merge_adapter(adapter_names=wanted),
                                 lambda: twin.merge_adapter(adapter_names=wanted))
            if not ran:
                return trace().stop("merge_adapter(adapter_names)", "both refused")
            if not _tied(mini):
                compare_structure("after merge_adapter(adapter_names)", mini, twin)
                compare_forward("forward merged (adapter_names)", mini, twin, inputs, rtol=1e-5)
                run_both("unmerge_adapter (adapter_names)", mini.unmerge_adapter, twin.unmerge_adapter)
                compare_forward("forward unmerged (adapter_names)", mini, twin, inputs, rtol=1e-5)
            else:
                return trace().stop("merge_adapter(adapter_names)", "a tied weight (documented difference)")
    if wide.get("multi_active"):
        if len(names) < 2:
            trace().skipped("base_model.set_adapter([...])", "the scenario has one adapter")
        else:
            both = names[:2]
            _, _, ran = run_both("base_model.set_adapter([...])", lambda: mini.base_model.set_adapter(both),
                                 lambda: twin.base_model.set_adapter(both))
            if not ran:
                return trace().stop("base_model.set_adapter([...])", "both refused")
            if ran:
                compare_structure("after base_model.set_adapter([...])", mini, twin)
                if list(mini.active_adapters) != list(twin.active_adapters):
                    raise Finding(f"active_adapters {mini.active_adapters} vs PEFT's {twin.active_adapters}")
                compare_forward("forward (both active)", mini, twin, inputs)
                compare_backward("backward (both active)", mini, twin, inputs)
                compare_train_step("AdamW step (both active)", mini, twin, inputs)
    if wide.get("base_set_adapter"):
        name = names[-1]
        on_base, frozen = wide["base_set_adapter"] if isinstance(wide["base_set_adapter"], tuple) else (True, False)
        step = f"{'base_model.' if on_base else ''}set_adapter(inference_mode={frozen})"
        _, _, ran = run_both(step, lambda: (mini.base_model if on_base else mini).set_adapter(name, inference_mode=frozen),
                             lambda: (twin.base_model if on_base else twin).set_adapter(name, inference_mode=frozen))
        if not ran:
            return trace().stop(step, "both refused")
        compare_structure(f"after {step}", mini, twin)
        compare_forward(f"forward after {step}", mini, twin, inputs)
    if wide.get("save_merged"):
        _, _, ran = run_both("merge_adapter (then save)", mini.merge_adapter, twin.merge_adapter)
        if not ran:
            return trace().stop("merge_adapter (then save)", "both refused")
        if _tied(mini):
            return trace().stop("merge_adapter (then save)", "a tied weight (documented difference)")
        _compare_saved("save_pretrained (merged)", mini, twin, {})
        run_both("unmerge_adapter (after save)", mini.unmerge_adapter, twin.unmerge_adapter)
        compare_forward("forward after unmerge (after save)", mini, twin, inputs, rtol=1e-5)
    if wide.get("selected_adapters"):
        chosen = _named(wide["selected_adapters"], mini)
        if chosen:
            _compare_saved(f"save_pretrained(selected_adapters={chosen})", mini, twin, dict(selected_adapters=chosen))
    if wide.get("merge_enable"):
        _, _, ran = run_both("merge_adapter (then disable)", mini.merge_adapter, twin.merge_adapter)
        if not ran:
            return trace().stop("merge_adapter (then disable)", "both refused")
        if ran and _tied(mini):
            return trace().stop("merge_adapter (then disable)", "a tied weight (documented difference)")
        if ran:
            for step, method in (("disable_adapter_layers (merged)", "disable_adapter_layers"),
                                 ("enable_adapter_layers (after merge)", "enable_adapter_layers")):
                _, _, ran = run_both(step, getattr(mini.base_model, method), getattr(twin.base_model, method))
                if not ran:
                    return trace().stop(step, "both refused")
                compare_structure(f"after {step}", mini, twin)
                compare_forward(f"forward after {step}", mini, twin, inputs, rtol=1e-5)
            run_both("unmerge_adapter (after enable)", mini.unmerge_adapter, twin.unmerge_adapter)
            compare_forward("forward after unmerge (after enable)", mini, twin, inputs, rtol=1e-5)
    if wide.get("train_step"):
        compare_train_step("AdamW step (before saving)", mini, twin, inputs)
        compare_forward("forward after the AdamW step", mini, twin, inputs)


def _compare_saved(step: str, mini: nn.Module, twin: nn.Module, kwargs: dict) -> None:
    """save_pretrained(**kwargs) on both: the files (parity.differential.compare_files)."""
    import tempfile
    from pathlib import Path

    from parity.differential import compare_files, run_both

    with tempfile.TemporaryDirectory() as tmp:
        mini_dir, peft_dir = Path(tmp) / "mini", Path(tmp) / "peft"
        _, _, ran = run_both(step, lambda: mini.save_pretrained(mini_dir, **kwargs),
                             lambda: twin.save_pretrained(peft_dir, **kwargs))
        if ran:
            for directory in (mini_dir, peft_dir):
                (directory / "README.md").unlink(missing_ok=True)
            compare_files(step, mini_dir, peft_dir)


def run_ending(wide: dict, mini: nn.Module, twin: nn.Module, inputs: dict) -> None:
    """The last call: what it returns and the outputs after it."""
    from parity.differential import compare_backward, compare_forward, compare_merge_and_unload, compare_structure, \
        run_both, trace

    kind, adapter_names = wide["ending"]
    if kind == "merge_and_unload":
        names = None if adapter_names is None else _named(adapter_names, mini)
        if names == []:
            return trace().skipped("merge_and_unload(safe_merge=True, adapter_names)", "no such adapter")
        return compare_merge_and_unload(mini, twin, inputs, dict(safe_merge=True, adapter_names=names))
    if kind in ("unload", "get_base_model"):
        from parity.differential import lora_summary

        saved = bool(lora_summary(mini)["saved"])
        a, b, ran = run_both(kind, getattr(mini, kind), getattr(twin, kind))
        if ran:
            if type(a).__name__ != type(b).__name__:
                from parity.differential import Finding

                raise Finding(f"{kind} returns {type(a).__name__} vs PEFT's {type(b).__name__}")
            if kind == "unload":
                _compare_unloaded(a, b)
                if saved:  # documented difference (README): minilora gives the original module back, PEFT the copy
                    return trace().stop("forward after unload", "modules_to_save (documented difference)")
            compare_forward(f"forward after {kind}", a, b, inputs)
        return
    dtype = DTYPES[kind]
    _, _, ran = run_both(f"to({kind})", lambda: mini.to(dtype), lambda: twin.to(dtype))
    if ran:
        inputs = cast_inputs(inputs, dtype)
        compare_structure(f"after to({kind})", mini, twin)
        _compare_dtypes(f"after to({kind})", mini, twin)
        compare_forward(f"forward in {kind}", mini, twin, inputs)
        compare_backward(f"backward in {kind}", mini, twin, inputs)
        _, _, ran = run_both(f"merge_adapter in {kind}", mini.merge_adapter, twin.merge_adapter)
        if not ran or _tied(mini):
            return trace().stop(f"merge_adapter in {kind}", "both refused" if not ran else "a tied weight (documented)")
        compare_forward(f"forward merged in {kind}", mini, twin, inputs, rtol=1e-2)
        run_both(f"unmerge_adapter in {kind}", mini.unmerge_adapter, twin.unmerge_adapter)
        compare_forward(f"forward unmerged in {kind}", mini, twin, inputs, rtol=1e-2)
        _compare_saved(f"save_pretrained in {kind}", mini, twin, {})


def _compare_unloaded(a: nn.Module, b: nn.Module) -> None:
    """unload: the plain modules and their values (README: minilora gives a modules_to_save wrapper's
    original back where PEFT keeps the trained copy; those modules' values are not compared)."""
    from parity.differential import Finding, trace

    keys_a, keys_b = set(a.state_dict()), set(b.state_dict())
    if keys_a != keys_b:
        raise Finding(f"unload state_dict keys: minilora only {sorted(keys_a - keys_b)[:5]}, PEFT only "
                      f"{sorted(keys_b - keys_a)[:5]}")
    trace().equal("unload")


def _compare_dtypes(step: str, mini: nn.Module, twin: nn.Module) -> None:
    from parity.differential import Finding, trace

    peft_state = twin.state_dict()
    differ = [(key, value.dtype, peft_state[key].dtype) for key, value in mini.state_dict().items()
              if key in peft_state and value.dtype != peft_state[key].dtype]
    if differ:
        raise Finding(f"{step}: dtypes differ from PEFT's: {differ[:4]}")
    trace().equal(step)


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


def _tied(model: nn.Module) -> bool:
    from minilora.inject import lora_layers

    return any(getattr(layer, "tied_to", None) for _, layer in lora_layers(model))


def run_dtype_start(wide: dict, config: dict, second: Any, base: nn.Module, inputs: dict, seed: int) -> None:
    """A fresh pair on a half-precision base, get_peft_model(..., autocast_adapter_dtype=...), and what
    follows on it (module docstring)."""
    import tempfile
    from pathlib import Path

    import peft

    from minilora import compat
    from parity.differential import (Finding, _other_adapters_biases, compare_backward, compare_files, compare_forward,
                                     compare_structure, compare_values, run_both, same_values, trace)

    kind, autocast = wide["dtype_start"]
    dtype = DTYPES[kind]
    step = f"get_peft_model({kind} base, autocast_adapter_dtype={autocast})"
    inputs = cast_inputs(inputs, dtype)

    def build(library):
        model = copy.deepcopy(base).to(dtype)
        torch.manual_seed(seed)
        return library.get_peft_model(model, library.LoraConfig(**copy.deepcopy(config)),
                                      autocast_adapter_dtype=autocast)

    mini, twin, ran = run_both(step, lambda: build(compat), lambda: build(peft))
    if not ran:
        return
    if type(mini).__name__ != type(twin).__name__:
        raise Finding(f"{step}: {type(mini).__name__} vs PEFT's {type(twin).__name__}")
    compare_structure(step, mini, twin)
    _compare_dtypes(f"{step} dtypes", mini, twin)
    compare_values(f"{step} values", mini, twin)
    same_values(mini, twin, seed)
    compare_forward(f"forward ({kind} base)", mini, twin, inputs)
    compare_backward(f"backward ({kind} base)", mini, twin, inputs)
    if second is not None:
        def add(model, library):
            torch.manual_seed(seed + 1)
            model.add_adapter("other", library.LoraConfig(**copy.deepcopy(second)), autocast_adapter_dtype=autocast)
            model.set_adapter("other")

        _, _, ran = run_both(f"add_adapter ({kind} base)", lambda: add(mini, compat), lambda: add(twin, peft))
        if not ran:
            return trace().stop(f"add_adapter ({kind} base)", "both refused")
        compare_structure(f"after add_adapter ({kind} base)", mini, twin)
        _compare_dtypes(f"after add_adapter ({kind} base) dtypes", mini, twin)
        compare_values(f"add_adapter ({kind} base) values", mini, twin)
        compare_forward(f"forward (other, {kind} base)", mini, twin, inputs)
    _, _, ran = run_both(f"merge_adapter ({kind} base)", mini.merge_adapter, twin.merge_adapter)
    if not ran:
        return trace().stop(f"merge_adapter ({kind} base)", "both refused")
    if _tied(mini):
        return trace().stop(f"merge_adapter ({kind} base)", "a tied weight (documented difference)")
    compare_forward(f"forward merged ({kind} base)", mini, twin, inputs, rtol=1e-2)
    run_both(f"unmerge_adapter ({kind} base)", mini.unmerge_adapter, twin.unmerge_adapter)
    compare_forward(f"forward unmerged ({kind} base)", mini, twin, inputs, rtol=1e-2)
    with tempfile.TemporaryDirectory() as tmp:
        mini_dir, peft_dir = Path(tmp) / "mini", Path(tmp) / "peft"
        _, _, ran = run_both(f"save_pretrained ({kind} base)", lambda: mini.save_pretrained(mini_dir),
                             lambda: twin.save_pretrained(peft_dir))
        if not ran:
            return
        for directory in (mini_dir, peft_dir):
            (directory / "README.md").unlink(missing_ok=True)
        compare_files(f"save_pretrained ({kind} base)", mini_dir, peft_dir)

        def load(library, directory):
            model = copy.deepcopy(base).to(dtype)
            return library.PeftModel.from_pretrained(model, directory, autocast_adapter_dtype=autocast).eval()

        loaded_mini, loaded_peft, ran = run_both(f"from_pretrained ({kind} base)", lambda: load(compat, peft_dir),
                                                 lambda: load(peft, mini_dir))
        if ran and _other_adapters_biases(peft_dir):  # (documented difference: see parity/differential.py)
            return trace().stop(f"forward loaded ({kind} base)", "biases of another adapter's layers (documented "
                                "difference)")
        if ran:
            compare_structure(f"from_pretrained ({kind} base)", loaded_mini, loaded_peft)
            _compare_dtypes(f"from_pretrained ({kind} base) dtypes", loaded_mini, loaded_peft)
            compare_forward(f"forward loaded ({kind} base)", loaded_mini, loaded_peft, inputs)

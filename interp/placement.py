"""Where a model's weights live: one device, or a device map that shards its layers over several devices and
offloads some to the CPU or to disk (accelerate's `device_map` / `max_memory`, as transformers takes them).

    place(hf, "cuda:1")                                                   # the whole model on one device
    place(hf, device_map="balanced", max_memory={0: "20GiB", "cpu": "64GiB"})   # over the GPUs, the rest offloaded
    place(hf, device_map={"model.embed_tokens": 0, "model.layers.0": 0, ..., "model.norm": 1, "lm_head": 1})

Under a device map, accelerate's hooks move each mapped module's inputs to the device it computes on (its
execution device) and, for an offloaded module (mapped to "cpu" beside a GPU, or to "disk"), load its weights onto
that device for its own forward only: between forwards an offloaded weight is a meta placeholder on the model.
`module_device` says where a module computes; `resident` reads a weight even when it is offloaded.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

from interp.errors import BadOption

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's automatic device maps: fill every GPU evenly ("auto" = "balanced"; "balanced_low_0" keeps GPU 0
light), or in order ("sequential"); what does not fit within `max_memory` is offloaded to the CPU, then disk."""
OFFLOAD = ("cpu", "disk")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; a CUDA device this machine lacks is a BadOption."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BadOption(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    missing = not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()
    if resolved.type == "cuda" and missing:
        raise BadOption(f"device {device!r} is not on this machine ({torch.cuda.device_count()} CUDA devices); "
                        f"use cpu or auto")
    return resolved


def place(hf: nn.Module, device: str | torch.device = "auto", *, device_map: str | Mapping | None = None,
          max_memory: Mapping | None = None) -> None:
    """Put `hf` (loaded on the CPU) on `device`, or dispatch it by `device_map`: one of STRATEGIES, or a dict
    {module name: device} naming modules that cover every weight (devices: an int or "cuda:N", "cpu", "disk", "mps").
    `max_memory` ({0: "20GiB", "cpu": "64GiB"}) caps each device for a strategy."""
    if device_map is None:
        if max_memory is not None:
            raise BadOption("max_memory needs a device map; pass device_map='balanced' (or 'sequential')")
        hf.to(resolve_device(device))
        return
    if str(device) != "auto":
        raise BadOption(f"device={device!r} and a device_map: pass one of them (the map places every module)")
    from accelerate import dispatch_model

    if max_memory is not None and not isinstance(device_map, str):
        raise BadOption("max_memory caps the devices of a strategy ('balanced', 'sequential'); an explicit device "
                        "map already says where every module goes")
    plan = _strategy(hf, device_map, max_memory) if isinstance(device_map, str) else _checked(hf, device_map)
    devices = [d for d in plan.values() if str(d) not in OFFLOAD]
    offload_dir = None
    if "disk" in map(str, plan.values()):
        offload_dir = tempfile.TemporaryDirectory(prefix="interp-offload-")
        hf._interp_offload_dir = offload_dir  # removed with the model
    quiet = logging.getLogger("accelerate.big_modeling")  # it warns of offload on every map naming "cpu"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        dispatch_model(hf, device_map=plan, main_device=devices[0] if devices else "cpu", force_hooks=True,
                       offload_dir=offload_dir and offload_dir.name,
                       skip_keys=getattr(hf, "_skip_keys_device_placement", None))
    except ValueError as e:  # accelerate's check that the map covers every weight
        raise BadOption(f"device map: {e}; name a device for every module that holds weights") from None
    finally:
        quiet.setLevel(level)


def _strategy(hf: nn.Module, name: str, max_memory: Mapping | None) -> dict:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if name not in STRATEGIES:
        raise BadOption(f"device map {name!r}: use one of {', '.join(STRATEGIES)}, or a dict {{module: device}}")
    no_split = getattr(hf, "_no_split_modules", None) or []
    memory = dict(max_memory) if max_memory is not None else None
    if name != "sequential":
        memory = get_balanced_memory(hf, max_memory=memory, no_split_module_classes=no_split,
                                     low_zero=name == "balanced_low_0")
    return dict(infer_auto_device_map(hf, max_memory=memory, no_split_module_classes=no_split))


def _checked(hf: nn.Module, device_map: Mapping) -> dict:
    """The map with its module names and devices checked (accelerate checks that it covers every weight)."""
    names = {name for name, _ in hf.named_modules()}
    unknown = [k for k in device_map if k and k not in names]
    if unknown:
        layers = next((n for n, m in hf.named_modules() if isinstance(m, nn.ModuleList)), "")
        raise BadOption(f"device map names {', '.join(map(repr, unknown))}, not modules of {type(hf).__name__}; "
                        f"name modules such as {layers}.0 (print the model for its module names)")
    for value in device_map.values():
        if str(value) not in OFFLOAD:
            resolve_device(f"cuda:{value}" if isinstance(value, int) else value)
    return dict(device_map)


def module_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's execution device under a device map (or the first
    hooked descendant's), else the device of its first real weight."""
    for m in module.modules():
        hook = _align_hook(m)
        if hook is not None and hook.execution_device is not None:
            d = hook.execution_device
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def resident(module: nn.Module, name: str) -> torch.Tensor | None:
    """`module`'s parameter or buffer `name` (None if it has none), read from accelerate's offload store onto the
    module's execution device when a device map offloads it (the module holds a meta placeholder)."""
    t = getattr(module, name, None)
    if t is None or t.device.type != "meta":
        return t
    hook = _align_hook(module)
    if hook is None or hook.weights_map is None:
        raise BadOption(f"{type(module).__name__}.{name} is on the meta device with no offload store to read it "
                        f"from; load the model with a device or a device map")
    return hook.weights_map[name].to(hook.execution_device)


def offloaded(hf: nn.Module) -> bool:
    """Whether a device map offloads some of `hf`'s weights (meta placeholders between forwards)."""
    return any(p.device.type == "meta" for p in hf.parameters())


def offload_store(hf: nn.Module) -> list[torch.Tensor]:
    """The CPU tensors accelerate keeps for `hf`'s offloaded weights (for sharing, not copying, them)."""
    stores = {}
    for m in hf.modules():
        weights = getattr(_align_hook(m), "weights_map", None)
        store = getattr(weights, "dataset", None)
        if store is not None:
            stores[id(store)] = store
    return [t for store in stores.values() for t in getattr(store, "state_dict", {}).values()]


def executed_map(hf: nn.Module) -> dict[str, str]:
    """`hf`'s device map with the device each module computes on: offloaded modules ("cpu" beside a GPU, "disk")
    compute on the main device."""
    return {name: str(module_device(hf.get_submodule(name))) for name in hf.hf_device_map}


def describe(hf: nn.Module) -> str:
    """'cuda:0', or 'device map: cuda:0 x 17, cuda:1 x 18, cpu (offloaded) x 2' (modules per device)."""
    plan = getattr(hf, "hf_device_map", None)
    if not plan:
        return str(module_device(hf))
    counts: dict[str, int] = {}
    for value in plan.values():
        key = f"cuda:{value}" if isinstance(value, int) else str(value)
        counts[key] = counts.get(key, 0) + 1
    main = any(k not in OFFLOAD for k in counts)
    return "device map: " + ", ".join(f"{k}{' (offloaded)' if k == 'disk' or (k == 'cpu' and main) else ''} x {n}"
                                      for k, n in counts.items())


def _align_hook(module: nn.Module):
    """accelerate's AlignDevicesHook on `module` (also inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if hasattr(h, "execution_device"):
            return h
    return None

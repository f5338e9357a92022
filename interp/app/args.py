"""Options shared by the commands, and turning them into a `Context`: the models loaded once, the prompt sets
(the user's files, or on zoo models the zoo's own), the output folder."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from interp.app import zoo_defaults
from interp.app.context import Context
from interp.errors import ModelNotFound
from interp.models import check_compatible, load_model, model_label, unique_labels
from interp.prompts import PromptSet, as_prompt_set, read_prompt_set


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (`interp: error: ...`) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"interp: error: {self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def nonneg_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return value


def finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1] (a threshold on cosines, a fraction)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1]")
    return value


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def device_name(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps, checked against the devices this machine has."""
    import torch

    if text in ("auto", "cpu"):
        return text
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("'mps' is not available on this machine; use cpu or auto")
        return text
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device; use cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


DTYPES = ("float32", "bfloat16", "float16", "float64")
MAP_STRATEGIES = ("balanced", "balanced_low_0", "sequential")
PLACEMENT_HELP = ("cuda, cuda:N, cpu, mps, auto (CUDA when present); or a device map splitting the model: "
                  f"{', '.join(MAP_STRATEGIES)} (over every GPU, the rest offloaded to the CPU; see --max-memory), or "
                  "a .json file {module: device}")


def placement(text: str) -> dict:
    """A --device value as `load_model` options: {"device": ...} or {"device_map": a strategy or a dict}."""
    if text in MAP_STRATEGIES:
        return {"device_map": text}
    if text.endswith(".json"):
        try:
            device_map = json.loads(Path(text).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise argparse.ArgumentTypeError(f"device map {text}: {e}") from None
        if not isinstance(device_map, dict):
            raise argparse.ArgumentTypeError(f"device map {text} is not a JSON object {{module: device}}")
        return {"device_map": device_map}
    return {"device": device_name(text)}


def max_memory(text: str) -> dict:
    """'0=20GiB,1=40GiB,cpu=64GiB' -> {0: "20GiB", 1: "40GiB", "cpu": "64GiB"} (accelerate's max_memory)."""
    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise argparse.ArgumentTypeError(f"{part!r}: write DEVICE=SIZE, e.g. 0=20GiB,cpu=64GiB")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default={"device": "auto"}, type=placement, metavar="DEVICE", help=PLACEMENT_HELP)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    p.add_argument("--max-memory", type=max_memory, metavar="DEV=SIZE,...",
                   help="memory per device for a device map, e.g. 0=20GiB,1=40GiB,cpu=64GiB (what does not fit "
                        "on the GPUs is offloaded to the CPU)")
    p.add_argument("--memory-budget", type=positive_float, metavar="GIB",
                   help="GiB a capture may hold in memory before it streams to shards (default 4, or "
                        "$INTERP_MEMORY_BUDGET in bytes)")
    p.add_argument("--backend", default="bridge", choices=("bridge", "nnsight"),
                   help="capture backend: TransformerLens TransformerBridge (default) or nnsight")


def add_run_arguments(p: argparse.ArgumentParser, *, many_tuned: bool, out_default: Path | None = None) -> None:
    """The pair (one or several tuned models), an optional series, prompt sets, the output folder."""
    p.add_argument("--base", default="zoo:base", help="pre-trained model: hub id, local folder or zoo name")
    if many_tuned:
        p.add_argument("--tuned", action="append", help="fine-tuned model (folder, PEFT adapter, hub id or zoo "
                                                        "name); repeat for several (zoo default: the base's "
                                                        "fine-tunes)")
    else:
        p.add_argument("--tuned", default=None, help="fine-tuned model: hub id, folder, PEFT adapter or zoo name "
                                                     "(zoo default: the base's full fine-tune)")
    p.add_argument("--series", help="a checkpoint series of the same fine-tuning (folder of step-N checkpoints; "
                                    "zoo default: the zoo's series)")
    p.add_argument("--prompts", type=Path, help="target-task prompts (.txt, or .jsonl with 'prompt' and optional "
                                                "'answer'); optional on zoo models")
    p.add_argument("--prompts-b", type=Path, help="a second prompt set to compare (zoo: pre-training skills)")
    p.add_argument("--n-prompts", type=positive_int, help="zoo prompts per set (default 64, 16 with --quick)")
    p.add_argument("--out", type=Path, required=out_default is None, default=out_default, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out (a "
                                                            "folder that holds results is refused otherwise)")
    add_model_arguments(p)
    for side in ("base", "tuned"):
        p.add_argument(f"--{side}-device", type=placement, metavar="DEVICE",
                       help=f"where the {side} model lives, instead of --device (same values)")
        p.add_argument(f"--{side}-dtype", choices=DTYPES, help=f"the {side} model's dtype, instead of --dtype")


def model_options(args, side: str | None = None) -> dict:
    """`load_model` placement options from the parsed arguments: --device, --dtype, --max-memory, overridden for
    one model of the pair by --base-* / --tuned-* (`side`)."""
    where = getattr(args, f"{side}_device", None) if side else None
    dtype = getattr(args, f"{side}_dtype", None) if side else None
    out = {**(where or args.device), "dtype": dtype or args.dtype}
    if "device_map" in out and args.max_memory is not None:
        out["max_memory"] = args.max_memory
    return out


def pair_options(args) -> dict[str, dict]:
    """{"base": options, "tuned": options} for `load_context` (see `model_options`)."""
    return {side: model_options(args, side) for side in ("base", "tuned")}


def prompt_sets(base: str, prompts: Path | None, prompts_b: Path | None, n_prompts: int) -> dict[str, PromptSet]:
    """The target set (first) and a comparison set: the given files, or on zoo models the zoo's own."""
    if prompts is None:
        return zoo_defaults.prompt_sets(base, n_prompts)
    sets = {(first := read_prompt_set(prompts)).label: first}
    if prompts_b is not None:
        second = read_prompt_set(prompts_b)
        label = second.label + ("-b" if second.label in sets else "")
        sets[label] = as_prompt_set(second, label)
    return sets


def tuned_specs(base: str, tuned: str | list[str] | None) -> list[str]:
    """The tuned models asked for, or a zoo base's default fine-tunes."""
    if tuned:
        return [tuned] if isinstance(tuned, str) else list(tuned)
    defaults = zoo_defaults.tuned_and_series(base)[0]
    if not defaults:
        raise ModelNotFound(f"pass --tuned for base {base}; zoo bases default to their fine-tunes")
    return list(defaults)


def stepper(prefix: str):
    """A progress-line printer with the time since it was made."""
    start = time.perf_counter()

    def step(msg: str) -> None:
        print(f"[{prefix} {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return step


def load_context(base: str, tuned: list[str], out: Path, *, prompts: Path | None = None,
                 prompts_b: Path | None = None, n_prompts: int | None = None, series: str | None = None,
                 quick: bool = False, options: dict | None = None, device: str = "auto", dtype: str = "float32",
                 backend: str = "bridge", placement: dict[str, dict] | None = None, step=print) -> Context:
    """Build the zoo models named (only those), read the prompt sets, load base and tuned models once and check
    every pair. `n_prompts`: zoo prompts per set (default 64, 16 when quick); `series`: default, a zoo base's.
    `placement` ({"base": ..., "tuned": ...}, `load_model` options such as device, dtype, device_map) replaces
    `device` and `dtype` per model."""
    series = series or zoo_defaults.tuned_and_series(base)[1]
    step("zoo: building (or reusing) the zoo models named")
    zoo_defaults.build([base, *tuned, series])
    sets = prompt_sets(base, prompts, prompts_b, n_prompts or (16 if quick else 64))
    step(f"loading {base} and {', '.join(map(str, tuned))}")
    placement = placement or {side: dict(device=device, dtype=dtype) for side in ("base", "tuned")}
    base_model = load_model(base, backend=backend, **placement["base"])
    labels = unique_labels([model_label(t) for t in tuned])
    models = {label: load_model(spec, base=base, backend=backend, **placement["tuned"])
              for label, spec in zip(labels, tuned)}
    for model in models.values():
        check_compatible(base_model, model)
    out = Path(out)
    return Context(base_model, models, dict(zip(labels, map(str, tuned))), sets, out, out, quick, step, series,
                   options or {}, str(base))


def context_from_args(args, options: dict, many_tuned: bool) -> Context:
    """The Context of `interp <lens>`: --base, --tuned (the first default only, unless the lens takes several),
    --series, the prompt sets, --out, and the lens' own options."""
    tuned = tuned_specs(args.base, args.tuned)
    return load_context(args.base, tuned if many_tuned else tuned[:1], args.out, prompts=args.prompts,
                        prompts_b=args.prompts_b, n_prompts=args.n_prompts, series=args.series,
                        quick=getattr(args, "quick", False), options=options,
                        placement=pair_options(args), backend=args.backend, step=stepper(args.command))

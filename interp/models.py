"""Loading models and pairs: hub ids, local Hugging Face folders, PEFT adapters, zoo names, checkpoint series.

A `Model` is a Hugging Face causal LM plus its tokenizer, frozen and in eval mode, with lazily built
backends (`bridge`: TransformerLens `TransformerBridge`; `nnsight`: an `NNsight` wrapper). Both share
the same weight tensors. Edits made active with `model.edit(...)` apply to every run through either backend.
Each model has its own device and dtype (a pair may live on two GPUs, in two dtypes), or a device map that shards
it over several devices and offloads some layers (`interp.placement`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from interp.errors import BadOption, CorruptWeights, IncompatibleModels, ModelNotFound, UnsupportedEdit
from interp.placement import (describe, executed_map, module_device, offload_store, offloaded, place, resident,
                              resolve_device)  # noqa: F401 (resolve_device: re-exported)

ZOO_PREFIX = "zoo:"


def model_label(spec: str | Path | Model) -> str:
    """Short label for tables and colours: zoo names without the prefix, folders by their last part."""
    spec = str(spec.name if isinstance(spec, Model) else spec).rstrip("/")
    return spec.removeprefix(ZOO_PREFIX) if spec.startswith(ZOO_PREFIX) else (Path(spec).name or spec)


def unique_labels(labels: Sequence[str]) -> list[str]:
    """`labels` with repeats numbered: ["full", "full"] -> ["full", "full-2"]."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise BadOption(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


@dataclass(eq=False)
class Model:
    """A frozen causal LM with its tokenizer. `backend` is the default for capture and interventions."""

    hf: nn.Module
    tokenizer: object
    name: str
    backend: str = "bridge"
    edits: list = field(default_factory=list)
    adapter: Path | None = None  # the PEFT adapter folder this model was merged from, when it was

    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.d_model // self.n_heads

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)

    @property
    def device(self) -> torch.device:
        """Where its inputs go: the device the input embedding computes on (under a device map, the first device)."""
        embed = self.hf.get_input_embeddings() if hasattr(self.hf, "get_input_embeddings") else None
        return module_device(embed if embed is not None else self.hf)

    @property
    def placement(self) -> str:
        """Its device, or its device map in short ('device map: cuda:0 x 17, cuda:1 x 18')."""
        return describe(self.hf)

    @property
    def offloaded(self) -> bool:
        """Whether a device map offloads some of its weights to the CPU or disk (see `weights`)."""
        return offloaded(self.hf)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every parameter as `hf.named_parameters()` names them (tied ones once), detached; an
        offloaded weight is read from its offload store onto the device its module computes on."""
        if not self.offloaded:
            yield from ((name, p.detach()) for name, p in self.hf.named_parameters())
            return
        modules = dict(self.hf.named_modules())
        for name, p in self.hf.named_parameters():
            owner, _, leaf = name.rpartition(".")
            yield name, resident(modules[owner], leaf).detach() if p.device.type == "meta" else p.detach()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @cached_property
    def bridge(self):
        """TransformerBridge over a structural copy of `hf` that shares its weight tensors (the bridge
        rewires the module tree it boots on; the copy keeps `hf` intact for nnsight and weight access)."""
        from transformer_lens.model_bridge import TransformerBridge

        if type(self.hf).__name__.startswith("Peft"):
            raise UnsupportedEdit(f"{self.name}: the bridge backend needs a merged adapter; "
                                  f"load with merge=True or use backend='nnsight'")
        shared = {id(t): t for t in [*self.hf.parameters(), *self.hf.buffers(), *offload_store(self.hf)]}
        twin = copy.deepcopy(self.hf, memo=shared)
        if getattr(twin, "hf_device_map", None):
            twin.hf_device_map = executed_map(twin)  # TransformerBridge refuses offload beside GPUs
        bridge = TransformerBridge.boot_transformers(self.name, hf_model=twin, tokenizer=self.tokenizer,
                                                     device=self.device, dtype=self.dtype)
        bridge.eval()
        return bridge

    @cached_property
    def nnsight(self):
        from nnsight import NNsight

        return NNsight(self.hf)

    @cached_property
    def architecture(self):
        from interp.backends.architectures import architecture

        return architecture(self.hf)

    @contextmanager
    def edit(self, *edits):
        """Apply `edits` (from `interp.intervene`) to every forward, loss and generation inside the block."""
        start = len(self.edits)
        self.edits.extend(edits)
        try:
            yield self
        finally:
            del self.edits[start:]

    def fingerprint(self) -> str:
        """Short content hash of the weights, for cache keys."""
        import hashlib

        h = hashlib.sha256(self.name.encode())
        for name, p in self.weights():
            h.update(name.encode())
            h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
            h.update(str(float(p.detach().float().sum())).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.hf.parameters())
        return (f"Model({self.name!r}: {type(self.hf).__name__}, {self.n_layers} layers, d_model {self.d_model}, "
                f"{self.n_heads} heads x {self.d_head}, vocab {self.config.vocab_size}, {n_params / 1e6:.2f}M params, "
                f"{self.dtype}, {self.placement}, backend {self.backend})")


def load_model(spec: str | Path, *, base: str | Path | None = None, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "float32", device_map: str | dict | None = None,
               max_memory: dict | None = None, merge: bool = True, backend: str = "bridge",
               requires_grad: bool = False) -> Model:
    """Load a model from a zoo name (`zoo:base`), a local HF folder, a PEFT adapter folder (on `base`, or
    the base its adapter_config names), or a hub id (needs hub access). Frozen, eval mode, on `device`, or placed by
    `device_map` (a dict {module: device} or 'balanced' / 'sequential', capped per device by `max_memory`; see
    `interp.placement`): loaded on the CPU, the adapter merged, then dispatched."""
    spec = str(spec)
    torch_dtype = resolve_dtype(dtype)
    folder, adapter = _resolve(spec, base)
    hf = _load_hf(folder, torch_dtype)
    tokenizer = _load_tokenizer(folder)
    if adapter is not None:
        hf = _apply_adapter(hf, adapter, merge)
    _check_finite_weights(hf, spec)
    from interp.backends.architectures import architecture

    architecture(hf)  # UnsupportedArchitecture, naming the family, for a model neither backend can run
    place(hf, device, device_map=device_map, max_memory=max_memory)
    hf.eval()
    hf.requires_grad_(requires_grad)
    return Model(hf, tokenizer, spec, backend=backend, adapter=adapter)


def _resolve(spec: str, base: str | Path | None) -> tuple[str, Path | None]:
    """(model folder or hub id, adapter folder or None)."""
    if spec.startswith(ZOO_PREFIX):
        from interp import zoo

        name = spec[len(ZOO_PREFIX):]
        path = _zoo_path(zoo, name)
        if zoo.is_lora(name):
            return str(_zoo_path(zoo, zoo.base_of(name))), path
        return str(path), None
    path = Path(spec).expanduser()
    if (path / "adapter_config.json").is_file():
        base_spec = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_spec:
            raise ModelNotFound(f"adapter {path} names no base model; pass base=... (--base)")
        base_folder, base_adapter = _resolve(str(base_spec), None)
        if base_adapter is not None:
            raise ModelNotFound(f"adapter {path}: its base {base_spec} is itself an adapter; merge it first")
        return base_folder, path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has no config.json; pass a Hugging Face model folder, a PEFT adapter "
                                f"folder, a hub id or a zoo name (zoo:base)")
        return str(path), None
    if path.is_file():
        raise ModelNotFound(f"{spec} is a file; pass the model's folder (the one holding config.json), a PEFT "
                            f"adapter folder, a hub id or a zoo name")
    if _looks_local(spec):
        raise ModelNotFound(f"model folder {spec} does not exist; check the path")
    return spec, None


def _looks_local(spec: str) -> bool:
    """A spec that names a path here, never a hub id: it starts with . / ~, has more than one slash, or its
    first part is a folder that exists here (`m/missing-model` with a folder `m`)."""
    first = spec.split("/")[0]
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or ("/" in spec and Path(first).is_dir())


def _zoo_path(zoo, name: str) -> Path:
    from interp.errors import ZooModelNotBuilt

    if name not in zoo.ALL_NAMES:
        raise ModelNotFound(f"unknown zoo model {name!r}; the zoo has {', '.join(zoo.ALL_NAMES)}")
    try:
        return zoo.model_path(name)  # MissingExtra for a real-zoo name without the extra that builds it
    except FileNotFoundError as e:
        raise ZooModelNotBuilt(str(e)) from None


def _load_hf(folder: str, dtype: torch.dtype) -> nn.Module:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    local = Path(folder)
    if local.is_dir() and not any(local.glob("*.safetensors")) and any(
            local.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
        raise CorruptWeights(f"{folder} holds only pickled weights (.bin/.pt), which interp never loads (unpickling "
                             f"runs code); convert them once where you trust the file: AutoModelForCausalLM."
                             f"from_pretrained(folder).save_pretrained(new_folder) writes model.safetensors")
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                                    use_safetensors=True)
    except SafetensorError as e:
        raise CorruptWeights(f"weights in {folder} cannot be read ({e}); re-save or re-download them") from None
    except OSError as e:
        if Path(folder).is_dir():
            raise CorruptWeights(f"weights in {folder} cannot be read ({str(e).splitlines()[0]})") from None
        raise ModelNotFound(f"cannot load {folder!r}: not a local folder, and the hub did not give it "
                            f"({str(e).splitlines()[0]})") from None


def _check_finite_weights(hf: nn.Module, spec: str) -> None:
    """NonFiniteValues naming the first weight tensor of `hf` that holds a NaN or inf."""
    from interp.errors import NonFiniteValues

    for name, p in hf.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            count = int((~torch.isfinite(p.detach())).sum())
            raise NonFiniteValues(f"{spec}: weight {name} holds {count} NaN or inf values; the checkpoint is "
                                  f"corrupt or diverged in training")


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _apply_adapter(hf: nn.Module, adapter: Path, merge: bool) -> nn.Module:
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(hf, str(adapter))
    except Exception as e:  # peft raises many types for unreadable adapters
        raise CorruptWeights(f"adapter {adapter} cannot be applied ({type(e).__name__}: {e})") from None
    return model.merge_and_unload() if merge else model


# ---------------------------------------------------------------------------------------------- pairs

NON_COMPUTING_FIELDS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_commit_hash",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_return_dict",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "id2label", "label2id", "task_specific_params", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "quantization_config", "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "num_beams", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "early_stopping"})
"""Config fields that do not change what the network computes (names, versions, dtypes, token ids, generation
defaults); a pair may differ in them. Every other field must be equal (context length, activation, norm epsilon,
rotary settings, sliding windows, tied embeddings, sizes, ...)."""


def config_differences(base, tuned) -> list[str]:
    """'field: base X, tuned Y' for every computing config field in which two HF configs differ."""
    a, b = base.to_dict(), tuned.to_dict()
    standard = {raw: name for name, raw in getattr(base, "attribute_map", {}).items()}  # n_layer -> num_hidden_layers
    keys = sorted((set(a) | set(b)) - NON_COMPUTING_FIELDS, key=lambda k: standard.get(k, k))
    return [f"{standard.get(k, k)}: base {a.get(k)}, tuned {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


@dataclass(eq=False)
class Pair:
    """A pre-trained `base` and a fine-tuned `tuned` model of the same architecture and tokenizer."""

    base: Model
    tuned: Model

    @property
    def models(self) -> tuple[Model, Model]:
        return self.base, self.tuned

    def changed_parameters(self) -> dict[str, float]:
        """Relative Frobenius change ||W_t - W_b|| / ||W_b|| of every parameter that differs (in float32, on the
        tuned weight's device)."""
        out = {}
        for (name, b), (_, t) in zip(self.base.weights(), self.tuned.weights(), strict=True):
            b, t = b.to(t.device, torch.float32), t.float()
            diff = (t - b).norm()
            if diff > 0:
                out[name] = float(diff / b.norm().clamp_min(1e-12))
        return out

    def __repr__(self) -> str:
        changed = self.changed_parameters()
        n_total = sum(1 for _ in self.base.hf.parameters())
        top = max(changed.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (f"Pair(\n  base  = {self.base!r}\n  tuned = {self.tuned!r}\n"
                f"  differs in {len(changed)}/{n_total} parameter tensors; largest relative change "
                f"{top[1]:.3g} at {top[0]}\n)")


def check_compatible(base: Model, tuned: Model) -> None:
    """Raise IncompatibleModels naming every field in which the two models differ."""
    problems = config_differences(base.config, tuned.config)
    if type(base.hf).__name__ != type(tuned.hf).__name__:
        problems.append(f"class: base {type(base.hf).__name__}, tuned {type(tuned.hf).__name__}")
    if base.tokenizer.get_vocab() != tuned.tokenizer.get_vocab():
        problems.append("tokenizer: vocabularies differ")
    if problems:
        raise IncompatibleModels(f"{base.name} and {tuned.name} differ ({'; '.join(problems)}); "
                                 f"pass a tuned model fine-tuned from this base")


def load_pair(base: str | Path | Model, tuned: str | Path | Model, *, base_device: str | torch.device | None = None,
              tuned_device: str | torch.device | None = None, base_dtype: str | torch.dtype | None = None,
              tuned_dtype: str | torch.dtype | None = None, base_device_map: str | dict | None = None,
              tuned_device_map: str | dict | None = None, **kwargs) -> Pair:
    """Load base and tuned (PEFT adapters are applied on `base`) and check they are compatible. `kwargs` go to
    both `load_model` calls (device, dtype, device_map, max_memory, backend, ...); the `base_*` / `tuned_*` options
    override device, dtype and device_map for one model, e.g. base on cuda:0 and tuned on cuda:1, or tuned in
    bfloat16 split over two GPUs."""
    kw = {"base": _own(kwargs, base_device, base_dtype, base_device_map),
          "tuned": _own(kwargs, tuned_device, tuned_dtype, tuned_device_map)}
    base_model = base if isinstance(base, Model) else load_model(base, **kw["base"])
    tuned_model = tuned if isinstance(tuned, Model) else load_model(tuned, base=_base_spec(base), **kw["tuned"])
    check_compatible(base_model, tuned_model)
    return Pair(base_model, tuned_model)


def _own(shared: dict, device, dtype, device_map) -> dict:
    """`load_model` options for one model of a pair: the shared ones, with its own device, dtype or device map in
    place of the shared placement (a device of its own drops a shared map, a map of its own a shared device)."""
    out = dict(shared)
    if device is not None:
        out = {k: v for k, v in out.items() if k not in ("device_map", "max_memory")} | {"device": device}
    if device_map is not None:
        out = {k: v for k, v in out.items() if k != "device"} | {"device_map": device_map}
    if dtype is not None:
        out["dtype"] = dtype
    return out


def _base_spec(base) -> str | None:
    return None if isinstance(base, Model) else str(base)


# ---------------------------------------------------------------------------------- checkpoint series

@dataclass
class CheckpointSeries:
    """Checkpoints of one training run, ordered by step, loaded lazily one at a time."""

    paths: list[Path]
    steps: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[int, Path]]:
        return iter(zip(self.steps, self.paths))

    def models(self, **kwargs) -> Iterator[tuple[int, Model]]:
        """Yield (step, model), loading each only when reached and dropping it before the next."""
        for step, path in self:
            yield step, load_model(path, **kwargs)


def load_series(spec: str | Path | Sequence[str | Path]) -> CheckpointSeries:
    """A folder of checkpoint folders (names ending in a step number, e.g. `step-0050`, `checkpoint-50`; model
    folders or PEFT adapter folders), `zoo:series`, or an explicit list of folders (kept in the given order)."""
    if isinstance(spec, (str, Path)):
        spec = str(spec)
        if spec.startswith(ZOO_PREFIX):
            from interp import zoo

            spec = str(_zoo_path(zoo, spec[len(ZOO_PREFIX):]))
        root = Path(spec)
        if not root.is_dir():
            raise ModelNotFound(f"checkpoint series folder {root} does not exist")
        found = [(int(m.group(1)), p) for p in root.iterdir()
                 if p.is_dir() and (m := re.search(r"(\d+)$", p.name))
                 and ((p / "config.json").is_file() or (p / "adapter_config.json").is_file())]
        if not found:
            raise ModelNotFound(f"{root} holds no checkpoint folders named like step-100 with a config.json "
                                f"(or a PEFT adapter_config.json)")
        found.sort()
        return CheckpointSeries([p for _, p in found], [s for s, _ in found])
    paths = [Path(p) for p in spec]
    for p in paths:
        if not p.is_dir():
            raise ModelNotFound(f"checkpoint folder {p} does not exist")
    return CheckpointSeries(paths, list(range(len(paths))))

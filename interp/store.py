"""The activation store: a corpus too large for memory, captured once into sharded safetensors and read back as a
stream of batches.

    store = capture_corpus("zoo:base", "corpus.jsonl", "store/", ["resid_post.1", "resid_post.3"], dtype="bfloat16")
    store = ActivationStore("store/")
    for x in store.batches("resid_post.3", 4096, shuffle_seed=0): ...    # x [batch, d_model]; one shard in memory

Corpus: a text file with one document per line, or JSON lines whose records are strings or carry a string "text"
(or "prompt"). Blank lines are skipped: document i is the i-th non-blank line. It is read as a stream, never whole.

Windows: each document is tokenised once, as the tokenizer does (its special tokens included), and cut into
consecutive, non-overlapping windows of `window` tokens (default: the model's context). Each window is one forward
from a fresh context, so a token past the first window sees only the earlier tokens of its own window, and only the
first window carries the BOS token when the tokenizer adds one. Window w of a document starts at its token w*window.

Shards: the windows in corpus order, packed into shards of at most `shard_tokens` tokens (a window never spans two
shards). One tokenising pass plans them before any forward, from the corpus, the tokenizer, `window` and
`shard_tokens` alone: never from how many workers capture them. Shard i (`shard-0000000i.safetensors`) holds, for
its tokens in corpus order, each site's activations [token, ...] (the site's shape without batch and pos) in the
store's dtype, and the int64 metadata "doc" (document index), "position" (token index in its document) and
"token" (token id).

Manifest (`store.json`): the model (name, fingerprint, dtype, sizes), the tokenizer's identity (class, size, sha256
of its vocabulary and special tokens), the sites, dtype, window, batch size and backend, the corpus (path, sha256,
documents, tokens), the plan, and for each shard its tokens and sha256 (None until written).

Resuming: a shard is written under a temporary name and renamed into place, so a shard under its own name is
complete, and a half-written one never counts. Capturing again into the same store with the same settings keeps
every complete shard (checked against its recorded sha256) and computes only the others; other settings on an
existing store raise, unless `overwrite`.

Workers (`workers=N` or `address=`): Ray actors, each holding its own model replica on its own device (one GPU
each when the cluster has GPUs, else `cpus_per_worker` CPUs), take shards from one queue and write them into the
one store; only the driver writes the manifest. A worker that dies is restarted and its shard retried (Ray's actor
restarts and task retries), and a retried shard found complete is kept. Every shard is computed from the same
windows in the same batches wherever it runs, so the merged store equals the single-process store byte for byte,
on the same hardware with as many torch threads per worker (`cpus_per_worker`, each worker's thread count) as the
single process had: on CPUs the thread count changes the floating-point results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import capture, file_sha256, memory_budget_in_force
from interp.errors import (BadModelArgument, BadOption, BadPrompts, CorruptWeights, IncompatibleModels, MissingExtra,
                           OverMemoryBudget, ResultNotFound)
from interp.models import Model, load_model
from interp.prompts import json_text
from interp.sites import site as parse_site

MANIFEST = "store.json"
FORMAT = 1
SHARD_TOKENS = 65_536
"""Default tokens per shard: what a reader holds in memory at a time is one shard of one site."""
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METADATA = ("doc", "position", "token")
RETRIES = 3
"""Restarts of a dead worker, and retries of the shard it was capturing."""
_TOKENISE_CHARS = 1 << 20  # documents tokenised together: at most this many characters (or 1024 documents)


# ------------------------------------------------------------------------------------------------ the corpus

def read_documents(path: str | Path, offset: int = 0, doc: int = 0) -> Iterator[tuple[int, int, str]]:
    """(byte offset of its line, document index, text) of each document from byte `offset` on, the first one being
    document `doc`: lines of a text file, or records of a .jsonl file; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise BadPrompts(f"corpus {path} does not exist; pass a text file (one document per line) or a .jsonl file")
    jsonl = path.suffix == ".jsonl"
    with path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            start, offset = offset, offset + len(raw)
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise BadPrompts(f"corpus {path}: byte {start + e.start} is not UTF-8; save it as UTF-8") from None
            if not text.strip():
                continue
            yield start, doc, json_text(text, f"corpus {path}: document {doc}", ("text", "prompt")) if jsonl else text
            doc += 1


def tokenised(tokenizer, documents: Iterator[tuple[int, int, str]]) -> Iterator[tuple[int, int, list[int]]]:
    """(offset, document index, token ids) of each document, tokenised a block of documents at a time."""
    block: list[tuple[int, int, str]] = []
    chars = 0
    for item in documents:
        block.append(item)
        chars += len(item[2])
        if chars >= _TOKENISE_CHARS or len(block) == 1024:
            yield from _encode(tokenizer, block)
            block, chars = [], 0
    yield from _encode(tokenizer, block)


def _encode(tokenizer, block: list[tuple[int, int, str]]) -> Iterator[tuple[int, int, list[int]]]:
    if block:
        ids = tokenizer([text for _, _, text in block], verbose=False)["input_ids"]
        yield from ((offset, doc, list(row)) for (offset, doc, _), row in zip(block, ids))


def plan_corpus(tokenizer, corpus: str | Path, window: int, shard_tokens: int = SHARD_TOKENS) -> dict:
    """The shards of a corpus, by one tokenising pass: {"documents", "tokens", "shards": [{"offset" (byte of the
    first document's line), "doc" (its index), "window" (the first window's index in it), "windows", "tokens"}]}."""
    if not 0 < window <= shard_tokens:
        raise BadOption(f"window {window} and shard_tokens {shard_tokens}: need 0 < window <= shard_tokens")
    shards: list[dict] = []
    documents = tokens = 0
    for offset, doc, ids in tokenised(tokenizer, read_documents(corpus)):
        documents, tokens = documents + 1, tokens + len(ids)
        for w, start in enumerate(range(0, len(ids), window)):
            n = min(window, len(ids) - start)
            if not shards or shards[-1]["tokens"] + n > shard_tokens:
                shards.append({"offset": offset, "doc": doc, "window": w, "windows": 0, "tokens": 0})
            shards[-1]["windows"] += 1
            shards[-1]["tokens"] += n
    if tokens == 0:
        raise BadPrompts(f"corpus {corpus} holds no tokens; write one document per line")
    return {"documents": documents, "tokens": tokens, "shards": shards}


def shard_windows(tokenizer, corpus: str | Path, entry: dict, window: int) -> list[tuple[int, int, list[int]]]:
    """(document, position of its first token, token ids) of every window of one planned shard (`plan_corpus`)."""
    out = []
    for _, doc, ids in tokenised(tokenizer, read_documents(corpus, entry["offset"], entry["doc"])):
        first = entry["window"] if doc == entry["doc"] else 0
        for start in range(first * window, len(ids), window):
            out.append((doc, start, ids[start: start + window]))
            if len(out) == entry["windows"]:
                return out
    raise BadPrompts(f"corpus {corpus} ends before the windows planned for it; did it change during the capture?")


# ---------------------------------------------------------------------------------------------- the workers

@dataclass(frozen=True)
class Job:
    """What every shard of one capture shares (sent to each worker)."""

    corpus: str
    store: str
    sites: tuple[str, ...]
    dtype: str
    window: int
    batch_size: int
    backend: str
    key: str


def shard_name(index: int) -> str:
    return f"shard-{index:08d}.safetensors"


class Worker:
    """Captures whole shards with one model replica: in this process, or as a Ray actor (`capture_corpus`), then
    with `threads` torch threads. `before_write(index)` runs once a shard is computed, just before it is written (a
    hook for logging and tests)."""

    def __init__(self, model: Model | str, options: dict | None = None,
                 before_write: Callable[[int], None] | None = None, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model if isinstance(model, Model) else load_model(model, **(options or {}))
        self.before_write = before_write

    def describe(self) -> dict:
        """The model's and tokenizer's identity, as the manifest records it."""
        m, tok = self.model, self.model.tokenizer
        vocab = json.dumps([sorted(tok.get_vocab().items()), tok.special_tokens_map], sort_keys=True)
        return {"model": m.name, "fingerprint": m.fingerprint(), "model_dtype": str(m.dtype).removeprefix("torch."),
                "n_layers": m.n_layers, "n_heads": m.n_heads, "d_model": m.d_model, "n_ctx": m.n_ctx,
                "tokenizer": {"class": type(tok).__name__, "size": len(tok),
                              "sha256": hashlib.sha256(vocab.encode()).hexdigest()}}

    def plan(self, corpus: str, window: int, shard_tokens: int) -> dict:
        return plan_corpus(self.model.tokenizer, corpus, window, shard_tokens)

    def capture_shard(self, job: Job, index: int, entry: dict) -> dict:
        """Capture shard `index` (planned as `entry`) into the store: {"tokens", "sha256"}. A complete shard of this
        capture already there (written by a worker that died before reporting it) is kept."""
        path = Path(job.store) / shard_name(index)
        if shard_key(path) == job.key:
            return shard_record(path)
        windows = shard_windows(self.model.tokenizer, job.corpus, entry, job.window)
        tensors = capture_windows(self.model, windows, job)
        if self.before_write is not None:
            self.before_write(index)
        write_shard(path, tensors, {"key": job.key, "shard": index, "tokens": len(tensors["token"])})
        return shard_record(path)


def capture_windows(model: Model, windows: list[tuple[int, int, list[int]]], job: Job) -> dict[str, Tensor]:
    """Every site's activations [token, ...] on the windows' tokens (in order, `job.batch_size` windows a forward),
    in the store's dtype, with the metadata "doc", "position" and "token" [token]."""
    dtype = STORE_DTYPES[job.dtype]
    parts: dict[str, list[Tensor]] = {s: [] for s in job.sites}
    for start in range(0, len(windows), job.batch_size):
        ids = [w[2] for w in windows[start: start + job.batch_size]]
        acts = capture(model, ids, list(job.sites), batch_size=job.batch_size, backend=job.backend, progress=False)
        for s in job.sites:
            parts[s].append(acts.tokens_of(s).to(dtype))
    out = {s: torch.cat(v) for s, v in parts.items()}
    out["doc"] = torch.cat([torch.full((len(ids),), doc) for doc, _, ids in windows])
    out["position"] = torch.cat([torch.arange(first, first + len(ids)) for _, first, ids in windows])
    out["token"] = torch.tensor([t for _, _, ids in windows for t in ids], dtype=torch.long)
    return out


def write_shard(path: Path, tensors: dict[str, Tensor], info: dict) -> None:
    """Write a shard under a temporary name (this process's own), then rename it into place. `info` goes into the
    header as one JSON string (safetensors writes several metadata entries in an order that varies by process)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"interp": json.dumps(info, sort_keys=True)})
    os.replace(tmp, path)


def shard_info(path: Path) -> dict:
    """The `info` a complete shard was written with ({} when there is no shard, or an unreadable one)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("interp", "{}"))
    except Exception:  # noqa: BLE001 (any unreadable file is a shard to compute again)
        return {}


def shard_key(path: Path) -> str | None:
    """The capture key a complete shard was written for (None when there is none)."""
    return shard_info(path).get("key")


def shard_record(path: Path) -> dict:
    return {"tokens": shard_info(path)["tokens"], "sha256": file_sha256(path)}


class _Local:
    """One worker in this process."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def describe(self) -> dict:
        return self.worker.describe()

    def plan(self, *args) -> dict:
        return self.worker.plan(*args)

    def run(self, job: Job, todo: list[tuple[int, dict]], done: Callable[[int, dict], None]) -> None:
        for index, entry in todo:
            done(index, self.worker.capture_shard(job, index, entry))

    def close(self) -> None:
        pass


class _RayPool:
    """`workers` Ray actors (default: one per GPU of the cluster, else one per `cpus` of its CPUs), each a
    `Worker` with its own model replica, restarted and its shard retried when it dies."""

    def __init__(self, spec: str, options: dict, workers: int | None, address: str | None, cpus: int,
                 before_write: Callable[[int], None] | None):
        try:
            import ray
        except ImportError:
            raise MissingExtra("capture on workers needs Ray: pip install -e '.[scale]'") from None
        import logging

        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            ray.init(address=address, num_cpus=None if address else (workers or 1) * cpus, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = workers or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
        actor = ray.remote(num_cpus=cpus, num_gpus=1 if gpus else 0, max_restarts=RETRIES,
                           max_task_retries=RETRIES)(Worker)
        self.actors = [actor.remote(spec, options, before_write, cpus) for _ in range(n)]

    def describe(self) -> dict:
        identities = self.ray.get([a.describe.remote() for a in self.actors])
        if any(i != identities[0] for i in identities):
            raise IncompatibleModels(f"the workers loaded different models: {identities}")
        return identities[0]

    def plan(self, *args) -> dict:
        return self.ray.get(self.actors[0].plan.remote(*args))

    def run(self, job: Job, todo: list[tuple[int, dict]], done: Callable[[int, dict], None]) -> None:
        queue, pending = list(reversed(todo)), {}

        def submit(actor) -> None:
            index, entry = queue.pop()
            pending[actor.capture_shard.remote(job, index, entry)] = (actor, index)

        for actor in self.actors[: len(queue)]:
            submit(actor)
        while pending:
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            actor, index = pending.pop(ref)
            done(index, self.ray.get(ref))
            if queue:
                submit(actor)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


# ----------------------------------------------------------------------------------------------- the capture

def capture_corpus(model: Model | str, corpus: str | Path, store: str | Path, sites: Sequence[str], *,
                   dtype: str = "float32", window: int | None = None, shard_tokens: int = SHARD_TOKENS,
                   batch_size: int = 16, backend: str | None = None, workers: int | None = None,
                   address: str | None = None, load_options: dict | None = None, cpus_per_worker: int = 1,
                   overwrite: bool = False, progress: bool = True,
                   before_write: Callable[[int], None] | None = None) -> ActivationStore:
    """Capture `sites` of `model` on every token of `corpus` into the store folder `store` (module docstring).

    `model`: a Model, or a spec that `load_model(spec, **load_options)` loads (in each worker, on its own device).
    `dtype`: the store's, "float32" or "bfloat16". `workers` / `address` (a Ray address: "auto" for the cluster
    `ray start --head` runs here, or "ray://HEAD:10001") capture on Ray workers instead of in this process.
    Resumes an interrupted capture of the same settings; `overwrite` replaces a store of other settings.
    """
    if dtype not in STORE_DTYPES:
        raise BadOption(f"store dtype {dtype!r}; use one of {', '.join(STORE_DTYPES)}")
    sites = tuple(dict.fromkeys(str(parse_site(s)) for s in sites))
    if not sites or any(parse_site(s).kind == "attn_pattern" for s in sites):
        raise BadOption(f"sites {list(sites)}: a store holds per-token sites (not attn_pattern); pass at least one")
    parallel = workers is not None or address is not None
    if parallel and isinstance(model, Model):
        raise BadModelArgument("capture on workers loads a replica in each: pass the model's spec (a zoo name, "
                               "folder or hub id) and load_options, not a loaded Model")
    if isinstance(model, Model) and model.edits:
        raise BadOption(f"{model.name} has active edits; a store records the unedited model (leave the edit block)")
    options = dict(load_options or {})
    if parallel:
        engine = _RayPool(str(model), options, workers, address, cpus_per_worker, before_write)
    else:
        engine = _Local(Worker(model, options, before_write))
    try:
        return _capture(engine, Path(corpus).resolve(), Path(store).resolve(), sites, dtype, window, shard_tokens,
                        batch_size, backend or (model.backend if isinstance(model, Model) else
                                                options.get("backend", "bridge")), overwrite, progress)
    finally:
        engine.close()


def _capture(engine, corpus: Path, store: Path, sites: tuple[str, ...], dtype: str, window: int | None,
             shard_tokens: int, batch_size: int, backend: str, overwrite: bool, progress: bool) -> ActivationStore:
    identity = engine.describe()
    for s in sites:
        parse_site(s).check(identity["n_layers"], identity["n_heads"])
    window = window or identity["n_ctx"]
    if window is None or (identity["n_ctx"] and window > identity["n_ctx"]):
        raise BadOption(f"window {window}: pass a window of at most the model's context ({identity['n_ctx']})")
    _check_budget(identity, sites, shard_tokens)
    settings = {"format": FORMAT, **identity, "sites": list(sites), "dtype": dtype, "window": window,
                "shard_tokens": shard_tokens, "batch_size": batch_size, "backend": backend}
    corpus_sha = file_sha256(corpus)
    key = hashlib.sha256(json.dumps([settings, corpus_sha], sort_keys=True).encode()).hexdigest()
    manifest = _reuse_or_clear(store, key, settings, corpus_sha, overwrite)
    if manifest is None:
        plan = engine.plan(str(corpus), window, shard_tokens)
        manifest = {**settings, "corpus": {"path": str(corpus), "sha256": corpus_sha, "documents": plan["documents"],
                                           "tokens": plan["tokens"]},
                    "key": key, "plan": plan["shards"], "shards": [None] * len(plan["shards"]), "complete": False}
        store.mkdir(parents=True, exist_ok=True)
        _write_manifest(store, manifest)
    for half_written in store.glob("shard-*.tmp"):  # left by a writer that died: never a shard
        half_written.unlink()
    todo = []
    for index, entry in enumerate(manifest["plan"]):
        path, recorded = store / shard_name(index), manifest["shards"][index]
        if shard_key(path) == key and (recorded is None or recorded["sha256"] == file_sha256(path)):
            manifest["shards"][index] = recorded or shard_record(path)
        else:  # missing, or altered since it was recorded
            path.unlink(missing_ok=True)
            manifest["shards"][index] = None
            todo.append((index, entry))
    done_tokens = sum(r["tokens"] for r in manifest["shards"] if r)
    bar = tqdm(total=manifest["corpus"]["tokens"], initial=done_tokens, unit="tok", unit_scale=True,
               desc=f"capture {identity['model']} -> {store.name}", disable=not progress)

    def done(index: int, record: dict) -> None:
        manifest["shards"][index] = record
        _write_manifest(store, manifest)
        bar.update(record["tokens"])

    job = Job(str(corpus), str(store), sites, dtype, window, batch_size, backend, key)
    with bar:
        engine.run(job, todo, done)
    manifest["complete"] = True
    _write_manifest(store, manifest)
    return ActivationStore(store)


def _check_budget(identity: dict, sites: tuple[str, ...], shard_tokens: int) -> None:
    """A shard, as captured (float32) and as written, must fit the memory budget."""
    whole_heads = [parse_site(s).kind == "head_out" and parse_site(s).head is None for s in sites]
    per_token = sum(identity["d_model"] * (identity["n_heads"] if heads else 1) for heads in whole_heads) * 4 * 2
    budget = memory_budget_in_force()
    if shard_tokens * per_token > budget:
        raise OverMemoryBudget(f"a shard of {shard_tokens} tokens needs about {shard_tokens * per_token / 2**30:.2f} "
                               f"GiB, over the memory budget of {budget / 2**30:.2f} GiB; pass shard_tokens <= "
                               f"{budget // per_token} (--shard-tokens) or fewer sites")


def _reuse_or_clear(store: Path, key: str, settings: dict, corpus_sha: str, overwrite: bool) -> dict | None:
    """The manifest of an interrupted (or finished) capture of these settings in `store`, or None for a new one;
    a store of other settings raises, or with `overwrite` is emptied."""
    path = store / MANIFEST
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if old.get("key") == key:
        return old
    if not overwrite:
        changed = [k for k in settings if old.get(k) != settings[k]]
        if old.get("corpus", {}).get("sha256") != corpus_sha:
            changed.append("corpus")
        raise BadOption(f"{store} holds another capture ({', '.join(changed) or 'format'} differ); pass a new "
                        f"store folder, or overwrite=True (--overwrite) to replace it")
    for old_shard in store.glob("shard-*.safetensors*"):
        old_shard.unlink()
    path.unlink()
    return None


def _write_manifest(store: Path, manifest: dict) -> None:
    tmp = store / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, store / MANIFEST)


# ------------------------------------------------------------------------------------------------ the reader

class ActivationStore:
    """A complete store written by `capture_corpus`, read a shard at a time. `len(store)` is its number of tokens;
    `n_layers` and `n_heads` are the model's, so `store` can stand for it where only its sizes are needed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise ResultNotFound(f"{self.path} is not an activation store ({MANIFEST} missing); write one with "
                                 f"interp capture --corpus FILE --store DIR")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        if not self.manifest["complete"]:
            written = sum(r is not None for r in self.manifest["shards"])
            raise ResultNotFound(f"the capture into {self.path} is incomplete ({written} of "
                                 f"{len(self.manifest['plan'])} shards); run the same capture again to finish it")

    def __len__(self) -> int:
        return self.manifest["corpus"]["tokens"]

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.path)!r}: {m['model']}, {', '.join(m['sites'])}, {m['dtype']}, "
                f"{len(self)} tokens of {m['corpus']['documents']} documents in {self.n_shards} shards)")

    name = property(lambda self: self.manifest["model"])
    sites = property(lambda self: list(self.manifest["sites"]))
    dtype = property(lambda self: STORE_DTYPES[self.manifest["dtype"]])
    n_layers = property(lambda self: self.manifest["n_layers"])
    n_heads = property(lambda self: self.manifest["n_heads"])
    d_model = property(lambda self: self.manifest["d_model"])
    window = property(lambda self: self.manifest["window"])
    n_shards = property(lambda self: len(self.manifest["plan"]))

    def shard_tokens(self) -> list[int]:
        """Tokens of each shard, in order."""
        return [entry["tokens"] for entry in self.manifest["plan"]]

    def key(self, site: str) -> str:
        """The canonical name of `site` in this store (BadOption when the store does not hold it)."""
        name = str(parse_site(site))
        if name not in self.manifest["sites"]:
            raise BadOption(f"site {name} is not in the store {self.path}; it holds {', '.join(self.sites)}")
        return name

    def shard(self, index: int, keys: Sequence[str]) -> dict[str, Tensor]:
        """The tensors `keys` (sites or metadata names) of shard `index`, each [token, ...]; nothing else is read."""
        with safe_open(str(self.path / shard_name(index)), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}

    def batches(self, site: str, batch_size: int, shuffle_seed: int | None = None, *,
                metadata: bool = False) -> Iterator:
        """Batches [batch, ...] of a site's rows, every row once (the last batch may be smaller), one shard in
        memory at a time: in store order, or with `shuffle_seed` in a seeded order of shards and of rows within
        each shard. With `metadata`, (rows, {"doc", "position", "token"}) pairs. A batch is a view of its shard: a
        consumer that keeps one keeps the shard (clone what you keep)."""
        keys = [self.key(site), *(METADATA if metadata else ())]
        for parts in self._stream(keys, batch_size, shuffle_seed):
            batch = (parts[0], dict(zip(METADATA, parts[1:]))) if metadata else parts[0]
            del parts  # a batch is a view of its shard: hold none while the next shard is read
            yield batch
            del batch

    def paired_batches(self, other: ActivationStore, site: str, batch_size: int, shuffle_seed: int | None = None,
                       other_site: str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """(rows of this store, rows of `other` on the same tokens) batches, as `batches` (the stores must hold
        the same corpus in the same shards: `check_aligned`)."""
        self.check_aligned(other)
        a, b = self._stream([self.key(site)], batch_size, shuffle_seed), \
            other._stream([other.key(other_site or site)], batch_size, shuffle_seed)
        for (x,), (y,) in zip(a, b):
            yield x, y
            del x, y  # views of their shards: hold none while the next shards are read

    def check_aligned(self, other: ActivationStore) -> None:
        """Raise unless `other` holds the same tokens in the same shards (same corpus, tokenizer, window, plan)."""
        fields = ("tokenizer", "window", "shard_tokens", "plan")
        differ = [f for f in fields if self.manifest[f] != other.manifest[f]]
        if self.manifest["corpus"]["sha256"] != other.manifest["corpus"]["sha256"]:
            differ.append("corpus")
        if differ:
            raise IncompatibleModels(f"stores {self.path} and {other.path} differ in {', '.join(differ)}; capture both "
                                     f"models on the same corpus with the same window and shard size")

    def rows(self, site: str, index: Tensor) -> Tensor:
        """The rows [len(index), ...] of a site (or of a metadata name: "doc", "position", "token") at store-wide
        token indices `index`, read one shard at a time."""
        key = site if site in METADATA else self.key(site)
        index = torch.as_tensor(index, dtype=torch.long)
        order = index.argsort()
        sorted_index, out, start = index[order], [], 0
        for i, n in enumerate(self.shard_tokens()):
            lo, hi = (int(torch.searchsorted(sorted_index, v)) for v in (start, start + n))
            if hi > lo:
                out.append(self.shard(i, [key])[key][sorted_index[lo:hi] - start])
            start += n
        if not out or sum(len(o) for o in out) != len(index):
            raise BadOption(f"token indices outside the store's {len(self)} tokens")
        picked = torch.cat(out)
        return picked[order.argsort()]

    def verify(self) -> None:
        """Check every shard against the sha256 the manifest records (CorruptWeights naming the first that
        differs)."""
        for i, record in enumerate(self.manifest["shards"]):
            if file_sha256(self.path / shard_name(i)) != record["sha256"]:
                raise CorruptWeights(f"{self.path / shard_name(i)} does not match its recorded sha256; delete it and "
                                     f"run the same capture again to recompute it")

    def _stream(self, keys: list[str], batch_size: int, shuffle_seed: int | None) -> Iterator[list[Tensor]]:
        """Batches of the tensors `keys`, one shard loaded at a time; the rows left over at the end of a shard (fewer
        than a batch) are copied and lead the next one's."""
        if batch_size < 1:
            raise BadOption(f"batch_size={batch_size}; pass a positive batch size")
        gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
        order = range(self.n_shards) if gen is None else torch.randperm(self.n_shards, generator=gen).tolist()
        carry: list[Tensor] | None = None
        for i in order:
            parts = list(self.shard(i, keys).values())
            if gen is not None:
                perm = torch.randperm(len(parts[0]), generator=gen)
                parts = [p[perm] for p in parts]
            if carry is not None:
                parts = [torch.cat([c, p]) for c, p in zip(carry, parts)]
            full = len(parts[0]) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield [p[start: start + batch_size] for p in parts]
            carry = [p[full:].clone() for p in parts] if full < len(parts[0]) else None
            del parts
        if carry is not None:
            yield carry

"""The activation store (interp.store): equal to a direct capture, resumable, the same bytes from Ray workers (one
killed midway included), streamed by its readers (LID, the shift dictionaries, the crosscoder) one shard at a time."""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import weakref
from pathlib import Path

import pytest
import torch

import interp
from analyses import lid, shift
from analyses.diffing.crosscoder import PairedActivations, paired_activations, train_crosscoder
from analyses.shift.result import _per_concept
from interp import store as store_module
from interp.app.cli import main
from interp.errors import BadOption, CorruptWeights, ResultNotFound
from interp.store import ActivationStore, capture_corpus

pytestmark = pytest.mark.usefixtures("single_thread")  # the workers run one thread each: so does this process

SITES = ["resid_post.1", "head_out.2", "resid_post.3"]
SHARD_TOKENS = 128


def _write_corpus(path: Path, zoo, n_docs: int, most: int, seed: int) -> Path:
    """Documents of 1 to `most` zoo examples each (several exceed the 48-token context), with a blank line."""
    rng = random.Random(seed)
    examples = [e for skill in zoo.SKILLS for e in zoo.task_prompts(skill, 20)]
    lines = [" ".join(f"{e.prompt} {e.answer}" for e in rng.sample(examples, rng.randint(1, most)))
             for _ in range(n_docs)]
    path.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(zoo_built, tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", zoo_built, 40, 5, 0)


@pytest.fixture(scope="module")
def short_corpus(zoo_built, tmp_path_factory) -> Path:
    """One zoo example per document: every document fits one window."""
    return _write_corpus(tmp_path_factory.mktemp("short") / "short.txt", zoo_built, 48, 1, 1)


@pytest.fixture(scope="module")
def model(zoo_built):
    return interp.load_model("zoo:base")


@pytest.fixture(scope="module")
def reference(model, corpus, tmp_path_factory) -> ActivationStore:
    """The single-process store every other way of writing it must equal byte for byte."""
    return capture_corpus(model, corpus, tmp_path_factory.mktemp("ref") / "store", SITES,
                          shard_tokens=SHARD_TOKENS, progress=False)


@pytest.fixture(scope="module")
def short_stores(zoo_built, short_corpus, tmp_path_factory) -> dict[str, ActivationStore]:
    root = tmp_path_factory.mktemp("short-stores")
    return {name: capture_corpus(f"zoo:{name}", short_corpus, root / name, ["resid_post.1", "resid_post.3"],
                                 shard_tokens=4096, progress=False) for name in ("base", "full")}


def _files(store: ActivationStore) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.path.iterdir())}


def _all_rows(store: ActivationStore, key: str) -> torch.Tensor:
    return torch.cat([store.shard(i, [key])[key] for i in range(store.n_shards)])


def test_store_equals_a_direct_capture_window_by_window(model, corpus, reference, tmp_path):
    texts = [line for line in corpus.read_text().splitlines() if line.strip()]
    assert len(reference) > 4 * SHARD_TOKENS and reference.n_shards >= 5
    assert max(reference.shard_tokens()) <= SHARD_TOKENS
    doc, position, token = (_all_rows(reference, k) for k in ("doc", "position", "token"))
    windows, expected_doc = [], []
    for d, text in enumerate(texts):
        ids = model.tokenizer(text)["input_ids"]
        assert token[doc == d].tolist() == ids and position[doc == d].tolist() == list(range(len(ids)))
        windows += [ids[s: s + model.n_ctx] for s in range(0, len(ids), model.n_ctx)]
        expected_doc += [d] * len(ids)
    assert sum(len(w) > 40 for w in windows) > 5 and len(windows) > len(texts)  # long documents were split
    assert doc.tolist() == expected_doc
    direct = interp.capture(model, windows, SITES, batch_size=16, progress=False)
    for s in SITES:
        stored = _all_rows(reference, s)
        assert stored.shape == direct.tokens_of(s).shape
        torch.testing.assert_close(stored, direct.tokens_of(s), rtol=0, atol=1e-5)
    half = capture_corpus(model, corpus, tmp_path / "bf16", SITES, dtype="bfloat16", shard_tokens=SHARD_TOKENS,
                          progress=False)
    assert half.dtype == torch.bfloat16 and half.shard_tokens() == reference.shard_tokens()
    for s in SITES:
        assert torch.equal(_all_rows(half, s), _all_rows(reference, s).to(torch.bfloat16))
    records = tmp_path / "corpus.jsonl"
    records.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    from_jsonl = capture_corpus(model, records, tmp_path / "jsonl", SITES, shard_tokens=SHARD_TOKENS, progress=False)
    assert from_jsonl.manifest["plan"] != [] and from_jsonl.shard_tokens() == reference.shard_tokens()
    assert all(torch.equal(_all_rows(from_jsonl, k), _all_rows(reference, k)) for k in [*SITES, "doc", "token"])
    reference.verify()


def test_resume_after_an_interruption_recomputes_nothing_done(model, corpus, reference, tmp_path, monkeypatch):
    path, k = tmp_path / "store", 2
    written, computed = [], []
    real_write, real_capture = store_module.write_shard, store_module.capture_windows

    def write_then_fail(shard_path, tensors, info):
        if len(written) == k:
            raise KeyboardInterrupt("interrupted")
        written.append(info["shard"])
        real_write(shard_path, tensors, info)

    monkeypatch.setattr(store_module, "write_shard", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        capture_corpus(model, corpus, path, SITES, shard_tokens=SHARD_TOKENS, progress=False)
    assert sorted(p.name for p in path.glob("shard-*")) == [f"shard-{i:08d}.safetensors" for i in range(k)]
    with pytest.raises(ResultNotFound, match="incomplete"):
        ActivationStore(path)
    (path / "shard-00000004.safetensors.999.tmp").write_bytes(b"half a shard")  # a writer that died mid-write
    monkeypatch.setattr(store_module, "write_shard", real_write)
    monkeypatch.setattr(store_module, "capture_windows", lambda m, windows, job: computed.append(windows[0][0]) or
                        real_capture(m, windows, job))
    resumed = capture_corpus(model, corpus, path, SITES, shard_tokens=SHARD_TOKENS, progress=False)
    assert len(computed) == reference.n_shards - k  # shards 0 .. k-1 were kept
    assert _files(resumed) == _files(reference)
    computed.clear()
    capture_corpus(model, corpus, path, SITES, shard_tokens=SHARD_TOKENS, progress=False)
    assert computed == []  # a complete store: nothing to do
    altered = path / "shard-00000003.safetensors"
    data = altered.read_bytes()
    altered.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte of the last tensor
    with pytest.raises(CorruptWeights, match="shard-00000003"):
        resumed.verify()
    capture_corpus(model, corpus, path, SITES, shard_tokens=SHARD_TOKENS, progress=False)
    assert len(computed) == 1 and _files(resumed) == _files(reference)  # the altered shard alone, computed again
    with pytest.raises(BadOption, match="dtype"):
        capture_corpus(model, corpus, path, SITES, dtype="bfloat16", shard_tokens=SHARD_TOKENS, progress=False)
    with pytest.raises(BadOption, match="not in the store"):
        next(resumed.batches("resid_post.0", 8))


def test_reading_batches_streams_one_shard_at_a_time(reference, monkeypatch):
    alive, loads = [], []
    real_shard = ActivationStore.shard

    def tracked(self, index, keys):
        """The shard's tensors, each on a numpy buffer of its own: the buffer lives as long as any view of them."""
        assert all(r() is None for r in alive)  # no earlier shard is held (not even by a view) when one is read
        buffers = [t.numpy().copy() for t in real_shard(self, index, keys).values()]
        loads.append(index)
        alive.extend(weakref.ref(b) for b in buffers)
        return dict(zip(keys, map(torch.from_numpy, buffers)))

    monkeypatch.setattr(ActivationStore, "shard", tracked)
    site, rows = "resid_post.3", []
    for batch in reference.batches(site, 50):  # (not enumerate: it holds the last item while it fetches the next)
        assert len(loads) <= len(rows) * 50 // min(reference.shard_tokens()) + 1  # shards read as they are reached
        rows.append(batch.clone())  # a batch is a view of its shard: the consumer decides what it keeps
        del batch
    assert len(loads) == reference.n_shards
    monkeypatch.undo()
    rows = torch.cat(rows)
    assert torch.equal(rows, _all_rows(reference, site))
    shuffled = torch.cat(list(reference.batches(site, 50, shuffle_seed=3)))
    again = torch.cat(list(reference.batches(site, 50, shuffle_seed=3)))
    assert torch.equal(shuffled, again) and not torch.equal(shuffled, rows)
    assert torch.equal(shuffled.sort(0).values, rows.sort(0).values)  # every row once
    picked = torch.tensor([5, len(reference) - 1, 0, 300])
    assert torch.equal(reference.rows(site, picked), rows[picked])


def test_lid_from_a_store_equals_lid_on_its_documents(model, short_corpus, short_stores):
    texts = [line for line in short_corpus.read_text().splitlines() if line.strip()]
    kw = dict(n_tokens=300, k=10, seed=2)
    from_store = lid.measure_stores({"base": short_stores["base"]}, [1, 3], **kw)
    direct = lid.measure_models({"base": model}, texts, [1, 3], progress=False, **kw)
    assert from_store.sites == direct.sites == ["resid_post.1", "resid_post.3"]
    for s in direct.sites:
        assert torch.equal(from_store.prompt["base", s], direct.prompt["base", s])
        assert torch.equal(from_store.position["base", s], direct.position["base", s])
        torch.testing.assert_close(from_store.lid["base", s], direct.lid["base", s], rtol=1e-5, atol=1e-5)
        assert len(from_store.lid["base", s]) > 150


def test_shift_dictionaries_and_shifts_streamed_equal_in_memory(short_stores):
    base, full = short_stores["base"], short_stores["full"]
    site, k = "resid_post.3", 4
    h_base, h_tuned = _all_rows(base, site), _all_rows(full, site)
    concepts = shift.learn_concepts_streamed(lambda: base.batches(site, 64), k, sample=10**6, restarts=4)
    in_memory = shift.learn_concepts(h_base, k, seed=0, restarts=4)
    torch.testing.assert_close(concepts.vectors, in_memory.vectors, rtol=0, atol=1e-5)
    sampled = shift.learn_concepts_streamed(lambda: base.batches(site, 64), k, sample=100, restarts=4)
    members = shift.concept_activations(sampled, h_base).argmax(-1)  # Lloyd's fixed point over every row:
    means = torch.stack([h_base[members == c].double().mean(0) for c in range(k)]).float()
    torch.testing.assert_close(sampled.vectors, means, rtol=0, atol=1e-5)  # each centroid its members' mean
    pca = shift.learn_concepts_streamed(lambda: base.batches(site, 64), 3, "pca")
    cos = (pca.vectors.double() @ shift.learn_concepts(h_base, 3, "pca").vectors.double().T).diagonal().abs()
    assert cos.min() > 1 - 1e-4
    result = shift.measure_stores(base, full, site, k=k, batch_size=64, sample=10**6, restarts=4)
    assert torch.equal(result.concepts, concepts.vectors)
    assign = shift.concept_activations(concepts, h_base).argmax(-1)
    shifts, counts = shift.concept_shifts(h_base, h_tuned, assign, k)
    torch.testing.assert_close(result.shifts, shifts, rtol=0, atol=1e-5)
    assert torch.equal(result.counts, counts) and int(counts.sum()) == len(base)
    torch.testing.assert_close(result.global_shift, (h_tuned - h_base).double().mean(0).float(), rtol=0, atol=1e-5)
    r = shift.recovery(h_base, h_tuned, shifts[assign])
    torch.testing.assert_close(result.cos[:, 2], _per_concept(r["cos"], assign, k), rtol=0, atol=1e-5)
    torch.testing.assert_close(result.rel_error[:, 2], _per_concept(r["rel_error"], assign, k), rtol=0, atol=1e-5)
    assert (result.rel_error[:, 2] <= result.rel_error[:, 0] + 1e-6).all() and len(result.to_frame()) == k


def test_crosscoder_trains_on_a_pair_of_stores(short_corpus, short_stores):
    texts = [line for line in short_corpus.read_text().splitlines() if line.strip()]
    data = PairedActivations.from_stores(short_stores["base"], short_stores["full"], 3)
    in_memory = paired_activations(interp.load_pair("zoo:base", "zoo:full"), texts, 3)
    assert len(data) == len(in_memory) > 0
    for got, want in zip(torch.cat([torch.stack(c, 1) for c in data.chunks()]).unbind(1), in_memory.chunk(0)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    result = train_crosscoder(data, expansion=2, k=4, steps=20, batch_size=64, log_every=10)
    assert result.data_tokens == len(data) and all(0 < f < 2 for f in result.fvu_base + result.fvu_tuned)


def test_cli_capture_into_a_store(corpus, reference, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["capture", "--sites", *SITES, "--corpus", str(corpus), "--store", str(out), "--shard-tokens",
            str(SHARD_TOKENS)]
    assert main(argv) == 0
    assert f"{len(reference)} tokens" in capsys.readouterr().out
    assert _files(ActivationStore(out)) == _files(reference)
    assert main(["capture", "--sites", "resid_post.1", "--corpus", str(corpus)]) == 2
    assert "--store" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- Ray workers

@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="the Ray workers need the 'scale' extra: pip install -e '.[scale]'")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    yield ray
    ray.shutdown()


def _die_once(marker: Path, log: Path, kill_at: int, index: int) -> None:
    """A worker's hook before it writes shard `index`: log it, and the first time at `kill_at`, die at once."""
    with log.open("a") as f:
        f.write(f"{index}\n")
    if index == kill_at and not marker.exists():
        marker.touch()
        os._exit(1)


def test_two_workers_write_the_single_process_store(ray_session, corpus, reference, tmp_path):
    store = capture_corpus("zoo:base", corpus, tmp_path / "ray", SITES, shard_tokens=SHARD_TOKENS, workers=2,
                           progress=False)
    assert _files(store) == _files(reference)


def test_a_worker_killed_midway_is_retried_and_nothing_is_lost_or_duplicated(ray_session, corpus, reference,
                                                                           tmp_path):
    marker, log = tmp_path / "killed", tmp_path / "log"
    hook = functools.partial(_die_once, marker, log, 1)
    store = capture_corpus("zoo:base", corpus, tmp_path / "ray", SITES, shard_tokens=SHARD_TOKENS, workers=2,
                           progress=False, before_write=hook)
    assert marker.exists()  # a worker died before writing shard 1
    computed = sorted(int(line) for line in log.read_text().split())
    assert computed == sorted([*range(reference.n_shards), 1])  # shard 1 computed again, every other once
    assert _files(store) == _files(reference)

"""Stage-prefix reuse: keys, atomic publishing, corruption, eviction, exact resumption,
concurrent trials on one prefix, and the cache CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from stagebudget.prefixcache import END, MANIFEST, STEP, PrefixCache, stage_keys
from stagebudget.schedule import Schedule, StageSpec


def _fill(text: str):
    def fill(folder: Path) -> None:
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "weights.bin").write_text(text)
    return fill


def _records(steps: int) -> dict:
    return {"steps": steps, "rows": [], "logs": [], "train_seconds": 1.0, "eval_seconds": 0.5,
            "start_seconds": 0.0}


# --- keys -------------------------------------------------------------------------------------
SFT = StageSpec(kind="sft", steps=100, lora_rank=16, learning_rate=1e-3)
RL = StageSpec(kind="rl", steps=20, lora_rank=4)


def test_steps_share_a_key_everything_else_changes_it():
    ctx = {"base_model": {"model.safetensors": "abc"}, "data": "d1", "seed": 0}
    base = stage_keys(ctx, [SFT, RL])
    assert stage_keys(ctx, [SFT.model_copy(update={"steps": 300}), RL])[0] == base[0]
    assert stage_keys(ctx, [SFT, RL.model_copy(update={"steps": 5})])[1] == base[1]
    # Where a stage is measured does not change what it trains.
    assert stage_keys(ctx, [SFT.model_copy(update={"eval_interval": 7}), RL]) == base
    changed = [
        stage_keys(ctx, [SFT.model_copy(update={"learning_rate": 3e-3}), RL]),
        stage_keys(ctx, [SFT.model_copy(update={"lora_rank": 0}), RL]),
        stage_keys(ctx, [SFT.model_copy(update={"batch_size": 8}), RL]),
        stage_keys({**ctx, "seed": 1}, [SFT, RL]),
        stage_keys({**ctx, "data": "d2"}, [SFT, RL]),
        stage_keys({**ctx, "base_model": {"model.safetensors": "abd"}}, [SFT, RL]),
    ]
    for keys in changed:
        assert keys[0] != base[0] and keys[1] != base[1]
    # RL after a longer SFT is a different RL stage: earlier stages count with their steps.
    longer = stage_keys(ctx, [SFT.model_copy(update={"steps": 300}), RL])
    assert longer[1] != base[1]


# --- publishing, lookup, corruption, eviction ------------------------------------------------
def test_publish_is_atomic_and_lookup_picks_the_longest_prefix(tmp_path):
    cache = PrefixCache(tmp_path)
    for steps in (10, 20, 30):
        assert cache.publish("k" * 32, STEP, steps, _records(steps), _fill(str(steps)))
    assert cache.publish("k" * 32, STEP, 20, _records(20), _fill("again")) is None  # exists
    assert cache.latest_checkpoint("k" * 32, 25).steps == 20
    assert cache.latest_checkpoint("k" * 32, 30).steps == 30
    assert cache.latest_checkpoint("k" * 32, 9) is None
    assert cache.find("k" * 32, END, 30) is None
    # A half-written entry (no manifest, e.g. a writer killed mid-copy) is never used.
    half = cache.key_dir("k" * 32) / "step-40"
    (half / "checkpoint").mkdir(parents=True)
    assert cache.latest_checkpoint("k" * 32, 50).steps == 30
    assert not list((tmp_path / "tmp").iterdir())  # no scratch left behind


def test_a_corrupted_entry_is_detected_removed_and_skipped(tmp_path, caplog):
    cache = PrefixCache(tmp_path)
    cache.publish("c" * 32, STEP, 10, _records(10), _fill("ten"))
    entry = cache.publish("c" * 32, STEP, 20, _records(20), _fill("twenty"))
    (entry.checkpoint / "weights.bin").write_text("tweNty")  # same size, other bytes
    assert cache.latest_checkpoint("c" * 32, 20).steps == 10
    assert not entry.path.exists()
    assert "damaged" in caplog.text


def test_eviction_removes_least_recently_used_first(tmp_path):
    cache = PrefixCache(tmp_path, max_gb=1.0)
    entries = [cache.publish("e" * 32, STEP, s, _records(s), _fill("x" * 1000)) for s in (1, 2, 3)]
    for i, entry in enumerate(entries):  # use order: 2 oldest, then 1, then 3
        t = 1_000_000 + {1: 0, 0: 10, 2: 20}[i]
        os.utime(entry.path / MANIFEST, (t, t))
    one = entries[0].size()
    removed = cache.evict(max_bytes=one + entries[2].size())
    assert [e.steps for e in removed] == [2]
    assert {e.steps for e in cache.all_entries()} == {1, 3}
    cache.find("e" * 32, STEP, 1)  # a hit counts as a use
    assert [e.steps for e in cache.evict(max_bytes=one)] == [3]


def test_the_size_cap_is_enforced_on_publish(tmp_path):
    cache = PrefixCache(tmp_path, max_gb=2500e-9)  # room for about two small entries
    for s in range(1, 6):
        cache.publish("f" * 32, STEP, s, _records(s), _fill("y" * 1000))
    assert cache.size() <= 2500
    assert max(e.steps for e in cache.all_entries()) == 5  # the newest survives


# --- the real path: builtin:test ----------------------------------------------------------------
BASE = {"path": "builtin:test"}  # set to the session's test base by the fixture below


@pytest.fixture(autouse=True)
def _base(request):
    if "tiny_base" in request.fixturenames:
        BASE["path"] = str(request.getfixturevalue("tiny_base"))


def _schedule(sft_steps: int, rl_steps: int | None = None, lr: float = 3e-3) -> Schedule:
    stages = [StageSpec(kind="sft", steps=sft_steps, lora_rank=8, eval_interval=5, batch_size=8,
                        learning_rate=lr)]
    if rl_steps is not None:
        stages.append(StageSpec(kind="rl", steps=rl_steps, lora_rank=4, eval_interval=4,
                                batch_size=4, learning_rate=1e-3))
    return Schedule(base_model=BASE["path"], stages=tuple(stages), seed=0)


def _train(schedule: Schedule, out: Path, cache: PrefixCache | None):
    from stagebudget.training.pipeline import run_schedule

    return run_schedule(schedule, out, prefix_cache=cache, save_model=True, device="cpu")


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def _accuracies(result) -> list:
    return [(r["stage_index"], r["step"], r["id_accuracy"], r["ood_accuracy"])
            for r in result.curves]


@pytest.mark.slow
def test_a_resumed_stage_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    """SFT 10 then (SFT 10 -> RL 8), then both extended: each resumes from a checkpoint
    mid-stage (optimizer, scheduler and RNG restored) and ends with the very same weights,
    curves and losses as runs without a cache."""
    plain_sft = _train(_schedule(20), tmp_path / "plain-sft", None)
    plain_rl = _train(_schedule(10, 12), tmp_path / "plain-rl", None)

    cache = PrefixCache(tmp_path / "cache")
    _train(_schedule(10, 8), tmp_path / "short", cache)
    sft = _train(_schedule(20), tmp_path / "sft", cache)
    rl = _train(_schedule(10, 12), tmp_path / "rl", cache)

    assert sft.ledger["stages"][0]["reused_steps"] == 10
    assert [s["reused_steps"] for s in rl.ledger["stages"]] == [10, 8]
    assert rl.ledger["spent_train_seconds"] < rl.ledger["train_seconds"]
    assert _same_weights(tmp_path / "plain-sft", tmp_path / "sft")
    assert _same_weights(tmp_path / "plain-rl", tmp_path / "rl")
    assert _accuracies(sft) == _accuracies(plain_sft)
    assert _accuracies(rl) == _accuracies(plain_rl)
    for a, b in ((sft, plain_sft), (rl, plain_rl)):
        for mine, theirs in zip(a.metrics["stages"], b.metrics["stages"], strict=True):
            for key in ("train_loss", "train_loss_first", "mean_reward", "zero_std_share"):
                assert mine.get(key) == theirs.get(key), key
    # A checkpoint that already holds all of a stage's steps is taken as it is (Trainer.train
    # would take one step more before comparing with max_steps).
    five = _train(_schedule(5), tmp_path / "five", cache)
    plain_five = _train(_schedule(5), tmp_path / "plain-five", None)
    assert five.ledger["stages"][0]["reused_steps"] == 5
    assert [s["steps_done"] for s in five.metrics["stages"]] == [5]
    assert _same_weights(tmp_path / "plain-five", tmp_path / "five")
    assert five.metrics["stages"][0]["train_loss"] == plain_five.metrics["stages"][0]["train_loss"]
    # RL trained from scratch after an SFT stage restored from the cache (no random numbers
    # drawn by a restore) starts exactly as after an SFT stage trained in the same process.
    other_rl = _schedule(10, 6)
    other_rl = other_rl.model_copy(update={"stages": (
        other_rl.stages[0], other_rl.stages[1].model_copy(update={"lora_rank": 2}))})
    fresh_rl = _train(other_rl, tmp_path / "fresh-rl", cache)
    plain_fresh_rl = _train(other_rl, tmp_path / "plain-fresh-rl", None)
    assert [s["reused_steps"] for s in fresh_rl.ledger["stages"]] == [10, 0]
    assert _same_weights(tmp_path / "plain-fresh-rl", tmp_path / "fresh-rl")
    assert _accuracies(fresh_rl) == _accuracies(plain_fresh_rl)
    # The same schedule again is a whole hit: nothing trains, everything is as measured.
    again = _train(_schedule(10, 12), tmp_path / "again", cache)
    assert again.ledger["spent_train_seconds"] == 0.0
    assert _accuracies(again) == _accuracies(plain_rl)
    assert again.objectives() == {**rl.objectives()}
    assert _same_weights(tmp_path / "plain-rl", tmp_path / "again")


@pytest.mark.slow
def test_a_changed_spec_never_hits_a_stale_entry(tmp_path):
    cache = PrefixCache(tmp_path / "cache")
    _train(_schedule(10), tmp_path / "a", cache)
    first = _train(_schedule(10), tmp_path / "a2", None)  # without the cache
    other = _train(_schedule(10, lr=1e-3), tmp_path / "b", cache)
    assert other.ledger["stages"][0]["reused_steps"] == 0
    assert other.ledger["spent_train_seconds"] > 0
    # ... but the base model's evaluation, the same for every trial, is taken from the cache
    assert other.ledger["stages"][0]["reused_eval_seconds"] > 0
    assert other.curves[0] == {**first.curves[0], "device_seconds": 0.0}


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_rebuilt_with_the_same_result(tmp_path):
    cache = PrefixCache(tmp_path / "cache")
    first = _train(_schedule(10), tmp_path / "a", cache)
    for entry in cache.all_entries():  # damage every weight file
        for f in entry.path.rglob("*.safetensors"):
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF
            f.write_bytes(bytes(data))
    again = _train(_schedule(10), tmp_path / "b", cache)
    assert again.ledger["stages"][0]["reused_steps"] == 0  # rebuilt, not reused
    assert _accuracies(again) == _accuracies(first)
    assert _same_weights(tmp_path / "a", tmp_path / "b")


def _train_in_process(args: tuple[str, str, str]) -> dict:
    root, out, base = args
    import torch

    torch.set_num_threads(1)
    BASE["path"] = base
    result = _train(_schedule(15), Path(out), PrefixCache(Path(root)))
    return {"spent": result.ledger["spent_train_seconds"],
            "reused": result.ledger["stages"][0]["reused_steps"],
            "curves": _accuracies(result)}


@pytest.mark.slow
def test_two_trials_on_one_prefix_train_it_once(tmp_path, tiny_base):
    ctx = multiprocessing.get_context("spawn")
    jobs = [(str(tmp_path / "cache"), str(tmp_path / f"out{i}"), str(tiny_base))
            for i in range(2)]
    with ctx.Pool(2) as pool:
        results = pool.map(_train_in_process, jobs)
    assert sorted(r["reused"] for r in results) == [0, 15]  # one trained, one waited and reused
    assert sorted(r["spent"] == 0.0 for r in results) == [False, True]
    assert results[0]["curves"] == results[1]["curves"]
    assert _same_weights(tmp_path / "out0", tmp_path / "out1")


def test_a_waiting_trial_goes_on_once_the_step_it_needs_is_published(tmp_path, monkeypatch):
    """A trial training a longer stage of the same prefix holds the lock for its whole stage; a
    trial that ends at an earlier step takes that step's checkpoint as soon as it is published,
    while one that needs another step waits for the lock as before."""
    import threading

    from stagebudget import prefixcache

    monkeypatch.setattr(prefixcache, "LOCK_POLL_SECONDS", 0.1)
    cache, key = PrefixCache(tmp_path), "k" * 32
    release, entered = threading.Event(), {5: threading.Event(), 7: threading.Event()}

    def holder() -> None:
        with cache.training(key):
            release.wait(30)

    def waiter(steps: int) -> None:
        with cache.training(key, steps):
            entered[steps].set()

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    while not (tmp_path / "locks" / f"{key}.lock").exists():
        threading.Event().wait(0.01)
    threads += [threading.Thread(target=waiter, args=(n,)) for n in (5, 7)]
    for t in threads[1:]:
        t.start()
    assert not entered[5].wait(0.5)  # nothing published yet: it waits
    cache.publish(key, STEP, 5, _records(5), _fill("5"))
    assert entered[5].wait(5)  # the holder still holds the lock
    assert not entered[7].is_set()  # step 7 is not there: still waiting for the lock
    release.set()
    assert entered[7].wait(5)
    for t in threads:
        t.join(5)


# --- the CLI ---------------------------------------------------------------------------------
def test_cache_ls_and_prune(tmp_path, capsys):
    from stagebudget.cli import main

    cache = PrefixCache(tmp_path)
    cache.publish("a" * 32, STEP, 10, _records(10), _fill("x" * 100))
    cache.publish("a" * 32, END, 10, _records(10), _fill("x" * 100))
    with pytest.raises(SystemExit) as done:
        main(["cache", "ls", "--dir", str(tmp_path)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "aaaaaaaaaaaa" in out
    with pytest.raises(SystemExit) as done:
        main(["cache", "prune", "--dir", str(tmp_path), "--max-gb", "-1"])
    assert done.value.code == 2
    with pytest.raises(SystemExit) as done:
        main(["cache", "prune", "--dir", str(tmp_path)])
    assert done.value.code == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cache.all_entries() == []


# --- through the real search ------------------------------------------------------------------
@pytest.mark.slow
def test_a_repeated_search_reuses_every_stage_and_reaches_the_same_front(tmp_path):
    """The same real search twice over one prefix cache: the second trains nothing, records
    the same objectives, and charges its budget only what it trained (run.json's spend)."""
    import yaml

    from runhelpers import DEMO
    from stagebudget.names import COMPLETE
    from stagebudget.rundir import RunDir
    from stagebudget.searching.driver import run_search

    data = yaml.safe_load(DEMO.read_text())
    data.update(base_model="builtin:test", trials=3, concurrency=1, references=False,
                tasks={"source": "builtin", "n_train": 200, "n_id_test": 20, "n_ood_test": 20},
                budget={"per_trial_hours": 0.002},
                reuse={"enabled": True, "cache_dir": "prefixes"})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    runs = [run_search(space, name=name, runs_dir=tmp_path / "runs", live=False)
            for name in ("first", "second")]
    first, second = ({json_key(r.params): r for r in RunDir(run).records()} for run in runs)
    assert first.keys() == second.keys()
    for key, rec in second.items():
        assert rec.status == COMPLETE, rec.error
        assert rec.ledger["spent_device_hours"] == 0.0
        assert rec.objectives == first[key].objectives
    meta = [json.loads((run / "run.json").read_text())["spend"] for run in runs]
    assert meta[0]["saved_share"] < 1.0 and meta[1]["saved_share"] == 1.0
    assert meta[1]["nominal_device_hours"] == pytest.approx(meta[0]["nominal_device_hours"])
    assert (tmp_path / "prefixes" / "entries").is_dir()  # relative to the space file


def json_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


@pytest.mark.slow
def test_every_stage_starts_from_the_same_random_state(tmp_path, tiny_base, one_thread,
                                                        monkeypatch):
    """A stage's LoRA initialisation and sampling draw from torch's global generator: after an
    earlier stage restored from the cache (no random numbers drawn) it must be in the state it
    is in after that stage trained in this process."""
    import hashlib

    import torch

    import stagebudget.training.stages as stages

    seen: list[tuple[str, str]] = []
    real = stages.get_stage

    def recording(kind):
        fn = real(kind)

        def wrapped(ctx):
            state = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()
            seen.append((kind, state))
            return fn(ctx)
        return wrapped

    monkeypatch.setattr(stages, "get_stage", recording)
    cache = PrefixCache(tmp_path / "cache")
    _train(_schedule(10, 4), tmp_path / "trained", None)
    trained = dict(seen)
    seen.clear()
    _train(_schedule(10), tmp_path / "sft", cache)
    seen.clear()
    _train(_schedule(10, 4), tmp_path / "restored", cache)  # SFT restored, RL trained
    assert [kind for kind, _ in seen] == ["rl"]
    assert seen[0][1] == trained["rl"]


@pytest.mark.slow
def test_stage_ends_keep_adapters_and_rebuild_the_same_weights(tmp_path):
    """A LoRA stage's end keeps its adapter, not merged weights; a full fine-tuning stage's
    end keeps its weights. A schedule restored whole (full FT, then LoRA RL rebuilt by merging
    its adapter onto the restored weights) has the very weights of a run without a cache."""
    full = _schedule(6, 4)
    full = full.model_copy(update={"stages": (
        full.stages[0].model_copy(update={"lora_rank": 0, "learning_rate": 1e-4}),
        full.stages[1])})
    cache = PrefixCache(tmp_path / "cache")
    first = _train(full, tmp_path / "first", cache)
    plain = _train(full, tmp_path / "plain", None)
    again = _train(full, tmp_path / "again", cache)
    assert again.ledger["spent_train_seconds"] == 0.0
    assert _accuracies(first) == _accuracies(plain) == _accuracies(again)
    assert _same_weights(tmp_path / "plain", tmp_path / "first")
    assert _same_weights(tmp_path / "plain", tmp_path / "again")
    ends = {e.steps: e for e in cache.all_entries() if e.kind == END}
    assert ends[6].holds() == "weights" and ends[4].holds() == "adapter"
    assert not ends[4].merged.exists()
    model_bytes = (tmp_path / "plain" / "model" / "model.safetensors").stat().st_size
    adapter_bytes = (ends[4].adapter / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < model_bytes / 2  # rank 4 on a model of hidden size 32
    holds = {e.holds() for e in cache.all_entries() if e.kind == STEP}
    assert holds == {"weights+optimizer", "adapter+optimizer"}


def test_cache_ls_says_what_each_entry_holds(tmp_path, capsys):
    from stagebudget.cli import main

    cache = PrefixCache(tmp_path)
    cache.publish("b" * 32, END, 4, _records(4), lambda d: (d / "adapter").mkdir())
    cache.publish("c" * 32, END, 4, _records(4), lambda d: (d / "merged").mkdir())
    with pytest.raises(SystemExit) as done:
        main(["cache", "ls", "--dir", str(tmp_path)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "adapter" in out and "weights" in out


@pytest.mark.slow
def test_a_search_keeps_checkpoints_where_trials_can_go_on(tmp_path, monkeypatch):
    """In a search, checkpoints stay at the steps the space plans and at the stage's end; a
    recovery checkpoint (every recovery_seconds, here every evaluation point) is written and
    then removed; with recovery off, nothing else is written at all."""
    published: list[int] = []
    real = PrefixCache.publish

    def spy(self, key, kind, steps, records, fill):
        if kind == STEP:
            published.append(steps)
        return real(self, key, kind, steps, records, fill)

    monkeypatch.setattr(PrefixCache, "publish", spy)
    from stagebudget.training.pipeline import run_schedule

    held = {}
    for recovery in (0.0, float("inf")):
        published.clear()
        cache = PrefixCache(tmp_path / f"cache-{recovery}")
        result = run_schedule(_schedule(15), tmp_path / f"out-{recovery}", prefix_cache=cache,
                              device="cpu", checkpoint_steps=[[5]], recovery_seconds=recovery)
        held[recovery] = (list(published), sorted(e.steps for e in cache.all_entries()
                                                  if e.kind == STEP), _accuracies(result))
    assert held[0.0][0] == [5, 10, 15] and held[float("inf")][0] == [5, 15]
    assert held[0.0][1] == held[float("inf")][1] == [5, 15]
    assert held[0.0][2] == held[float("inf")][2]  # what is kept never changes what trains

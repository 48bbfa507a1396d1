"""Each stage on a tiny model: it trains, respects its LoRA rank, merges, and the ledger stops it."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from stagebudget.schedule import StageSpec
from stagebudget.tasks import Example
from stagebudget.training.clock import BudgetClock
from stagebudget.training.stages import StageContext, get_stage, lora_config, merge

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ToySuite:
    """A tiny suite whose RL reward always varies within a group (so GRPO has a gradient)."""

    train: list[Example] = field(default_factory=lambda: [
        Example(f"rc:{s}=", s[::-1], "toy", "train")
        for s in ("ACGT", "GGCA", "TTAC", "CAGT", "ATTA", "GCGC", "TAGC", "CCAT")
    ])
    id_test: list[Example] = field(default_factory=list)
    ood_test: list[Example] = field(default_factory=list)
    # a graded scorer of its own: the RL reward adds no partial credit
    tasks: dict[str, Any] = field(default_factory=lambda: {"toy": SimpleNamespace(scorer="toy")})
    answer_mode: str = "full"

    def score(self, example: Example, prediction: str) -> float:
        return float(prediction.strip() == example.answer)

    def reward(self, example: Example, completion: str) -> float:
        return len(completion.strip()) / 12.0


class Spy:
    """A TrainerCallback that records the model TRL trains, as seen at the start of training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Spy(TrainerCallback):
            def __init__(self) -> None:
                self.lora_shapes: dict[str, tuple[int, ...]] = {}
                self.trainable: tuple[int, int] = (0, 0)
                self.peft = False

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                from peft import PeftModel

                self.peft = isinstance(model, PeftModel)
                params = list(model.named_parameters())
                self.trainable = (sum(p.requires_grad for _, p in params), len(params))
                self.lora_shapes = {n: tuple(p.shape) for n, p in params if "lora_" in n}

        return _Spy()


def _context(model, tokenizer, suite, spec, evals=None):
    clock = BudgetClock(None)
    clock.begin_stage(spec.kind, 0, planned_steps=spec.steps, planned_seconds=0.0)
    spy = Spy()
    ctx = StageContext(
        model=model, tokenizer=tokenizer, suite=suite, spec=spec, stage_index=0, clock=clock,
        evaluate=lambda m, step: (evals.append(step) if evals is not None else None) or {},
        seed=0, extra_callbacks=[spy],
    )
    return ctx, spy


def _spec(kind: str, rank: int, steps: int = 3) -> StageSpec:
    if kind == "rl":
        return StageSpec(kind="rl", steps=steps, lora_rank=rank, batch_size=4, num_generations=4,
                         max_completion_length=6, learning_rate=1e-2, eval_interval=2)
    return StageSpec(kind=kind, steps=steps, lora_rank=rank, batch_size=8, learning_rate=1e-2,
                     eval_interval=2)  # type: ignore[arg-type]


@pytest.fixture
def loaded(tiny_base):
    from stagebudget.training.model import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_base)


@pytest.mark.parametrize("kind", ["cpt", "sft", "rl"])
@pytest.mark.parametrize("rank", [0, 4])
def test_stage_trains_and_merges(loaded, kind, rank):
    model, tokenizer = loaded
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evals: list[int] = []
    ctx, spy = _context(model, tokenizer, ToySuite(), _spec(kind, rank), evals)

    out = get_stage(kind)(ctx)

    assert out.steps_done == 3
    assert evals == [2]  # every eval_interval steps; step 0 and the end are the pipeline's
    assert type(out.model).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n for n, _ in out.model.named_modules())
    after = dict(out.model.named_parameters())
    assert set(after) == set(before)
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    if rank == 0:
        assert not spy.peft
        assert spy.trainable[0] == spy.trainable[1]  # full fine-tuning trains every tensor
        assert len(changed) == len(before)
    else:
        assert spy.peft and spy.lora_shapes
        for name, shape in spy.lora_shapes.items():
            assert (shape[0] if "lora_A" in name else shape[1]) == rank, name
        # every linear projection of every layer carries an adapter; the head does not
        assert not any("lm_head" in n for n in spy.lora_shapes)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert any(f"{proj}.lora_A" in n for n in spy.lora_shapes), proj
        assert changed and all("proj" in n for n in changed)  # merged: base projections moved
    assert len([r for r in ctx.logs if "loss" in r]) == 3
    if kind == "rl":
        assert len(out.metrics["reward_per_step"]) == 3
        assert out.metrics["reward_first"] is not None
    else:
        assert out.metrics["train_loss"] is not None


def test_lora_config_is_built_in_one_place():
    assert lora_config(StageSpec(kind="sft", steps=1, lora_rank=0)) is None
    cfg = lora_config(StageSpec(kind="rl", steps=1, lora_rank=16))
    assert cfg.r == 16 and cfg.lora_alpha == 32 and cfg.target_modules == "all-linear"
    cfg = lora_config(StageSpec(kind="sft", steps=1, lora_rank=8, lora_alpha=4))
    assert cfg.lora_alpha == 4


def test_merge_passes_plain_models_through(loaded):
    model, _ = loaded
    assert merge(model) is model


def test_budget_callback_stops_only_past_the_guard(loaded):
    model, tokenizer = loaded
    spec = _spec("sft", 4, steps=10_000)
    ctx, _ = _context(model, tokenizer, ToySuite(), spec)
    ctx.clock.budget_seconds = 1.0
    out = get_stage("sft")(ctx)
    entry = ctx.clock.current
    assert 1 <= out.steps_done < 10_000
    assert entry.stopped_by_guard
    assert 4.0 <= ctx.clock.train_seconds() <= 4.0 + entry.max_step_seconds + 0.05


def test_clock_charges_training_and_evaluation_apart():
    now = [0.0]
    clock = BudgetClock(10.0, timer=lambda: now[0])
    clock.begin_stage("sft", 0, planned_steps=5, planned_seconds=5.0)
    with clock.training():
        now[0] += 3.0
        with clock.evaluating():
            now[0] += 100.0
        now[0] += 4.0
    assert clock.train_seconds() == 7.0
    assert clock.current.eval_seconds == 100.0
    assert clock.remaining() == 3.0 and not clock.past_guard()
    with clock.training():
        now[0] += 5.0
    assert clock.overrun_seconds() == 2.0 and not clock.past_guard()  # guard: 40 s
    ledger = clock.ledger()
    assert ledger["train_seconds"] == 12.0 and ledger["overrun_seconds"] == 2.0
    assert ledger["over_budget"] and ledger["guard_seconds"] == 40.0
    with clock.training():
        now[0] += 28.5
    assert clock.past_guard()


def test_a_reused_prefix_counts_on_the_guards_clock_not_the_load_it_was_trained_under():
    """A prefix trained beside busy processes took 4x its planned wall time (its stopwatch
    seconds), but only its planned CPU time per thread: a trial that reuses it must not pass the
    guard for it (seen: 4 of 12 demo trials FAILED that way on a loaded machine)."""
    now, cpu = [0.0], [0.0]
    first = BudgetClock(10.0, timer=lambda: now[0], cpu_timer=lambda: cpu[0], threads=1)
    first.begin_stage("sft", 0, planned_steps=5, planned_seconds=8.0)
    with first.training():
        now[0] += 32.0  # wall: 4x, under load
        cpu[0] += 8.0   # CPU time per thread: as planned
    assert first.stage_seconds()[0] == 32.0 and first.stage_guarded_seconds() == 8.0
    again = BudgetClock(10.0, timer=lambda: now[0], cpu_timer=lambda: cpu[0], threads=1)
    again.begin_stage("sft", 0, planned_steps=5, planned_seconds=8.0)
    again.credit(5, 32.0, 0.0, guard_seconds=first.stage_guarded_seconds())
    again.begin_stage("rl", 1, planned_steps=2, planned_seconds=2.0)
    with again.training():
        now[0] += 4.0
        cpu[0] += 2.0
    assert again.train_seconds() == 36.0       # nominal: what was measured, reuse included
    assert again.guarded_seconds() == 10.0 and not again.past_guard()  # guard: 40 s
    legacy = BudgetClock(10.0, timer=lambda: now[0], cpu_timer=lambda: cpu[0], threads=1)
    legacy.begin_stage("sft", 0, planned_steps=5, planned_seconds=8.0)
    legacy.credit(5, 41.0, 0.0)  # an entry without guard seconds: its stopwatch counts
    assert legacy.past_guard()


def test_gpu_seconds_count_devices_held():
    now = [0.0]
    clock = BudgetClock(None, device="cuda", gpus=2, timer=lambda: now[0])
    clock.begin_stage("rl", 0, planned_steps=1, planned_seconds=1.0)
    with clock.training():
        now[0] += 1.5
    assert clock.train_seconds() == 3.0
    with pytest.raises(ValueError, match="budget_seconds"):
        BudgetClock(0.0)


def test_reward_metrics_report_the_task_score_apart_from_the_shaped_reward():
    from stagebudget.training.stages.rl import reward_metrics

    logs = [{"step": i + 1, "reward": 1.0 + i / 10, "frac_reward_zero_std": 0.25}
            for i in range(8)]
    calls = [[(("t", 1), 1.0, s), (("t", 1), 1.0, s)] for s in (.2, .2, .3, .3, .4, .4, .6, .6)]
    out = reward_metrics(logs, calls=calls)
    assert out["reward_first"] == pytest.approx(1.05) and out["reward_last"] == pytest.approx(1.65)
    assert out["score_first"] == pytest.approx(0.2) and out["score_last"] == pytest.approx(0.6)
    assert out["score_gain"] == pytest.approx(0.4) and out["zero_std_share"] == 0.25
    assert reward_metrics([])["score_gain"] is None


def test_matched_gain_ignores_which_prompts_a_quarter_drew():
    """Prompts drawn in a harder mix late in a stage do not read as the model getting worse."""
    from stagebudget.training.stages.rl import matched_gain, reward_metrics

    easy, hard = ("charge", 4), ("translate", 5)
    # the model does not change: easy prompts always score 1, hard ones 0; the early steps
    # drew mostly easy prompts, the late steps mostly hard ones
    calls = [[(easy, 1.0, 1.0)] * 3 + [(hard, 0.0, 0.0)]] * 4 \
        + [[(easy, 1.0, 1.0)] + [(hard, 0.0, 0.0)] * 3] * 4
    out = reward_metrics([{"step": i + 1, "reward": sum(r for _, r, _ in c) / 4}
                          for i, c in enumerate(calls)], calls=calls)
    assert out["reward_gain"] == pytest.approx(-0.5)
    assert out["reward_gain_matched"] == pytest.approx(0.0)
    better = calls[:4] + [[(easy, 1.0, 1.0)] + [(hard, 0.5, 0.0)] * 3] * 4
    assert matched_gain(better, 1) == pytest.approx(0.25)  # hard prompts +.5, half the rows
    assert matched_gain(better, 2) == pytest.approx(0.0)
    assert matched_gain([]) is None


def test_rl_prompts_come_in_every_stretch_in_proportion():
    """Each quarter of an RL stage draws the same mix of tasks and answer lengths, whatever the
    seed, so the first-vs-last-quarter reward measures learning, not the prompt order."""
    import random
    from collections import Counter

    from stagebudget.training.stages.rl import stratified_order

    rng = random.Random(5)
    strata = [rng.choice([("charge", 4), ("translate", 2), ("translate", 9), ("rare", 1)])
              for _ in range(800)]
    whole = Counter(strata)
    for seed in (0, 1):
        order = stratified_order(strata, seed)
        assert sorted(order) == list(range(800))
        assert order == stratified_order(strata, seed)  # drawn by the seed alone
        for q in range(4):
            quarter = Counter(strata[i] for i in order[q * 200:(q + 1) * 200])
            for key, n in whole.items():
                assert abs(quarter[key] - n / 4) <= 1, (seed, q, key)
    assert stratified_order(strata, 0) != stratified_order(strata, 1)


def test_an_rl_stage_trains_on_its_prompts_in_the_stratified_order(loaded, monkeypatch):
    """GRPO keeps the order the stage drew (no shuffle of its own), and the order is exported."""
    from stagebudget.training.stages import rl
    from stagebudget.trlconfig import trl_config_kwargs

    model, tokenizer = loaded
    suite = ToySuite()
    seen: list[str] = []
    real = rl.suite_reward

    def spying(suite_, partial=None):
        inner = real(suite_, partial)

        def reward(prompts, **kwargs):
            seen.extend(dict.fromkeys(prompts))  # 4 completions per prompt, in order
            return inner(prompts=prompts, **kwargs)

        reward.__name__, reward.calls = inner.__name__, inner.calls
        return reward

    monkeypatch.setattr(rl, "suite_reward", spying)
    ctx, _ = _context(model, tokenizer, suite, _spec("rl", 4, steps=2))
    rl.run_rl(ctx)
    assert seen == [row["prompt"] for row in rl.rl_rows(suite.train, ctx.seed)][:8]
    assert trl_config_kwargs(_spec("rl", 4))["shuffle_dataset"] is False


def test_an_sft_stage_reuses_the_set_trl_prepared_and_trains_the_same_weights(tiny_base,
                                                                                monkeypatch):
    from trl import SFTTrainer

    from stagebudget.training.model import load_model_and_tokenizer
    from stagebudget.training.stages import sft

    prepare = SFTTrainer._prepare_dataset
    calls: list[int] = []

    def counting(self, *args, **kwargs):
        calls.append(1)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", counting)
    monkeypatch.setattr(sft, "_prepared", type(sft._prepared)())

    def train(spec: StageSpec) -> dict[str, torch.Tensor]:
        model, tokenizer = load_model_and_tokenizer(tiny_base)
        ctx, _ = _context(model, tokenizer, ToySuite(), spec)
        return {n: p.detach().clone() for n, p in get_stage("sft")(ctx).model.named_parameters()}

    spec = _spec("sft", 4)
    first = train(spec)
    assert len(calls) == 1
    again = train(spec)
    assert len(calls) == 1  # prepared once, reused
    assert first.keys() == again.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)

    monkeypatch.setattr(sft, "_prepared", type(sft._prepared)())
    fresh = train(spec)  # a process that never prepared it
    assert len(calls) == 2
    assert all(torch.equal(first[n], fresh[n]) for n in first)

    train(StageSpec(kind="sft", steps=3, lora_rank=4, batch_size=8, learning_rate=1e-2,
                    eval_interval=2, max_length=12))  # other truncation: prepared again
    assert len(calls) == 3

    monkeypatch.setattr(sft, "_prepared", type(sft._prepared)())
    monkeypatch.setattr(sft, "PREPARED_MAX_BYTES", 0)  # too large to keep: prepared every time
    train(spec)
    train(spec)
    assert len(calls) == 5 and not sft._prepared


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_a_stage_config_turns_checkpointing_off_without_a_deprecation_warning(loaded, kind):
    import warnings

    from stagebudget.training.stages.common import training_args
    from stagebudget.trlconfig import config_class

    model, tokenizer = loaded
    ctx, _ = _context(model, tokenizer, ToySuite(), _spec(kind, 4))
    config = getattr(__import__("trl"), config_class(ctx.spec).rpartition(".")[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = config(**training_args(ctx))
    assert args.gradient_checkpointing is False
    assert getattr(args, "activation_checkpointing", False) is False

"""Reinforcement learning: TRL ``GRPOTrainer`` on the training prompts, rewarded by the suite.

TRL counts ``per_device_train_batch_size`` in completions, not prompts: a step of ``batch_size``
prompts with ``num_generations`` completions each is ``batch_size * num_generations`` rows (with
``steps_per_generation`` = 1, one generation batch per optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stagebudget.training.stages.common import (
    StageContext,
    StageOutput,
    last_of,
    lora_config,
    mean_of,
    quiet_libraries,
    stage_callbacks,
    train_and_merge,
    training_args,
)
from stagebudget.training.vllmcheck import check_vllm

REWARD_NAME = "suite_reward"
ZERO_STD_LOG = "frac_reward_zero_std"  # TRL's share of groups with identical rewards


def stratum(task: str, answer: str) -> tuple[str, int]:
    """The difficulty class of a prompt: its task and the length of its answer."""
    return task, len(answer)


def stratified_order(strata: list[Any], seed: int) -> list[int]:
    """Indices of ``strata`` in an order where every stretch holds each stratum in proportion.

    Each stratum's items are shuffled, the i-th of a stratum of n is placed at (i + u) / n
    (u uniform in [0, 1), drawn per item), and all items are sorted by place. A step of 8 prompts
    then draws the same mix of tasks and answer lengths early and late in a stage, so the
    reward's rise from the first to the last quarter measures learning, not which prompts a
    random order happened to put where (a shuffled order moved it by up to -.1 at learning rate
    1e-7, experiments/README.md).

    >>> order = stratified_order(["a", "a", "b", "b"], seed=0)
    >>> sorted(order), sorted(["ab".index(x) for x in ("a", "b")])
    ([0, 1, 2, 3], [0, 1])
    >>> sorted({("a", "a", "b", "b")[i] for i in order[:2]})
    ['a', 'b']
    """
    import random

    rng = random.Random(seed)
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(strata):
        members.setdefault(key, []).append(i)
    placed: list[tuple[float, int]] = []
    for key in sorted(members, key=repr):
        items = members[key]
        rng.shuffle(items)
        placed += [((j + rng.random()) / len(items), i) for j, i in enumerate(items)]
    return [i for _, i in sorted(placed)]


def rl_rows(train: list[Any], seed: int) -> list[dict[str, Any]]:
    """``{"prompt", "answer", "task"}`` rows of the training examples in :func:`stratified_order`
    (drawn by ``seed``); answer and task reach the reward as keyword columns. The rl kind sets
    ``shuffle_dataset=False``, so the trainer (and an exported plain-TRL script) keeps this order.
    """
    if not train:
        raise ValueError("the task suite has no training examples: an rl stage needs n_train >= 1")
    order = stratified_order([stratum(e.task, e.answer) for e in train], seed)
    return [{"prompt": train[i].prompt, "answer": train[i].answer, "task": train[i].task}
            for i in order]


def rl_dataset(ctx: StageContext) -> Any:
    """The stage's :func:`rl_rows` as a dataset. A prompt is text or chat messages; TRL renders
    messages with the chat template, as SFT and evaluation do (:mod:`stagebudget.chat`).
    """
    from datasets import Dataset

    return Dataset.from_list(rl_rows(ctx.suite.train, ctx.seed))


def completion_text(completion: Any) -> str:
    """The generated text: a string, or the content of a chat completion's messages.

    >>> completion_text([{"role": "assistant", "content": "MW"}])
    'MW'
    """
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


# Weight of the partial credit added to an exact-match task's reward
# (:func:`stagebudget.tasks.scoring.partial_credit`). A small model sampling 8 completions of a
# prompt it mostly solves gets the same exact-match reward for all of them (no GRPO signal);
# per-position credit separates near misses from garbage.
PARTIAL_CREDIT = 0.5


def suite_reward(suite: Any, partial: float | None = None) -> Callable[..., list[float | None]]:
    """A TRL reward function: ``suite.reward`` (the task's scorer + a format term) plus
    ``partial`` (default :data:`PARTIAL_CREDIT`) times the partial credit of tasks scored by
    exact match. Every call's rows are kept on the function as ``calls`` (per completion: its
    :func:`stratum`, reward and task score), so a stage can report the task score apart from
    the shaping and compare like with like (:func:`reward_metrics`).

    TRL 1.16 calls it as ``f(prompts=, completions=, completion_ids=, answer=[...], task=[...],
    trainer_state=, ...)``, one list entry per completion; chat completions are lists of
    messages.
    """
    from stagebudget.tasks import Example
    from stagebudget.tasks.scoring import extract, partial_credit

    weight = PARTIAL_CREDIT if partial is None else partial
    calls: list[list[tuple[tuple[str, int], float, float]]] = []

    def reward(prompts: list[Any], completions: list[Any], answer: list[str], task: list[str],
               **_: Any) -> list[float | None]:
        out: list[float] = []
        scores: list[float] = []
        for p, c, a, t in zip(prompts, completions, answer, task, strict=True):
            text, example = completion_text(c), Example(p, a, t, "train")
            scores.append(suite.score(example, text))
            credit = partial_credit(suite.tasks[t].scorer, extract(suite.answer_mode, text), a)
            out.append(float(suite.reward(example, text)) + weight * credit)
        calls.append([(stratum(t, a), r, sc) for t, a, r, sc in zip(task, answer, out, scores,
                                                                  strict=True)])
        rewards: list[float | None] = list(out)  # TRL's type: None skips a reward
        return rewards

    reward.__name__ = REWARD_NAME
    reward.calls = calls  # type: ignore[attr-defined]
    return reward


def generating_model(model: Any) -> Any:
    """``model`` ready for GRPO's sampling: a Mixture-of-Experts model no longer returns its
    router logits by default (``output_router_logits`` off in its config).

    TRL's SFT trainer turns that setting on for MoE models (its load-balancing loss), and
    transformers' ``generate`` then fails on padded batches (the loss spans the attention mask,
    a cached step's logits do not: Qwen3-MoE failed every RL stage after SFT). GRPO still adds
    the loss when it scores completions: it asks for router logits in that forward itself.
    The exported script calls this too.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "output_router_logits", False):
        config.output_router_logits = False
    return model


def generation_record(spec: Any) -> dict[str, Any]:
    """What sampled a stage's completions, and whether a re-run samples the same ones.

    transformers' ``generate`` draws from torch's generator, seeded by the trial's seed: a
    re-run on the same kernels and versions samples the same completions, so it trains the same
    weights. vLLM is not bit-reproducible by default (batch composition, CUDA kernels and
    prefix caching change floating-point sums), and TRL seeds vLLM's sampler with the process
    index, not the trial's seed: the planned steps, data order, prompts and LoRA initialisation
    are the same, the completions and hence the weights are not.

    >>> from stagebudget.schedule import StageSpec
    >>> generation_record(StageSpec(kind="rl", steps=1))["engine"]
    'transformers'
    """
    if spec.vllm is None:
        return {"engine": "transformers", "bit_reproducible": True}
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("vllm")
    except PackageNotFoundError:
        release = None
    return {"engine": "vllm", "vllm_version": release, "bit_reproducible": False,
            "sampler_seed": "process index (TRL), not the trial seed", **spec.vllm.model_dump()}


def run_rl(ctx: StageContext) -> StageOutput:
    """Train one GRPO stage (own LoRA adapter, or full fine-tuning at rank 0) and merge it."""
    from trl import GRPOConfig, GRPOTrainer

    quiet_libraries()
    spec = ctx.spec
    if spec.vllm is not None:  # a cluster node checks here; search and train checked already
        check_vllm([(spec.kind, spec)], None)
    with ctx.clock.setting_up():
        args = GRPOConfig(**training_args(ctx, log_completions=False))
        reward = suite_reward(ctx.suite)
        trainer = GRPOTrainer(
            model=generating_model(ctx.model),
            reward_funcs=[reward],
            args=args,
            train_dataset=rl_dataset(ctx),
            processing_class=ctx.tokenizer,
            peft_config=lora_config(spec),
            callbacks=stage_callbacks(ctx),
        )
    model, steps, adapter = train_and_merge(ctx, trainer)
    metrics = reward_metrics(ctx.logs, calls=reward.calls)  # type: ignore[attr-defined]
    metrics["generation"] = generation_record(spec)
    return StageOutput(model=model, metrics=metrics, steps_done=steps, adapter=adapter)


def _quarters(values: list[float]) -> tuple[float | None, float | None]:
    """Means of the first and the last quarter of ``values`` (at least one value each)."""
    if not values:
        return None, None
    k = max(1, len(values) // 4)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def matched_gain(calls: list[list[tuple[Any, float, float]]], which: int = 1) -> float | None:
    """Last-quarter minus first-quarter mean of ``which`` (1: reward, 2: task score), compared
    within strata (task, answer length) present in both quarters and weighted by their rows.

    ``calls`` holds one list per reward call (one step) of ``(stratum, reward, score)``. A
    stage sees each prompt once, in an order drawn by the seed; a quarter that happened to draw
    harder prompts would otherwise count as the model getting worse.

    >>> c = [[(("a", 1), 1.0, 1.0), (("b", 9), 0.0, 0.0)], [(("b", 9), 0.5, 0.0)]]
    >>> matched_gain(c)
    0.5
    """
    if not calls:
        return None
    k = max(1, len(calls) // 4)
    first: dict[Any, list[float]] = {}
    last: dict[Any, list[float]] = {}
    for rows, into in ((calls[:k], first), (calls[-k:], last)):
        for call in rows:
            for row in call:
                into.setdefault(row[0], []).append(float(row[which]))
    shared = [key for key in first if key in last]
    if not shared:
        return None
    weights = {key: len(first[key]) + len(last[key]) for key in shared}
    total = sum(weights.values())
    return sum(weights[key] * (sum(last[key]) / len(last[key]) - sum(first[key]) / len(first[key]))
               for key in shared) / total


def reward_metrics(logs: list[dict[str, Any]],
                   calls: list[list[tuple[Any, float, float]]] | None = None) -> dict[str, Any]:
    """Mean reward per logged step, the first vs the last quarter of the stage, and the share
    of GRPO groups whose completions all got the same reward (no signal for GRPO).

    ``reward_first``/``reward_last`` average the first/last quarter of the logged steps (at
    least one step each), since one step's mean over a few prompts is noisy. ``calls`` (the
    reward's rows per step, :func:`suite_reward`) give ``score_first``/``score_last``/
    ``score_gain`` the same way from each step's mean task score (without format term and
    partial credit), and ``reward_gain_matched``/``score_gain_matched`` (:func:`matched_gain`):
    the same gains compared within prompts of equal task and answer length.
    """
    rows = [r for r in logs if r.get("reward") is not None]
    rewards = [float(r["reward"]) for r in rows]
    first, last = _quarters(rewards)
    scores = [sum(row[2] for row in call) / len(call) for call in calls or [] if call]
    score_first, score_last = _quarters(scores)
    return {
        "mean_reward": mean_of(rows, "reward"),
        "reward_first": first,
        "reward_last": last,
        "reward_gain": (last - first) if first is not None and last is not None else None,
        "reward_gain_matched": matched_gain(calls or [], 1),
        "score_first": score_first,
        "score_last": score_last,
        "score_gain": (score_last - score_first) if score_first is not None
        and score_last is not None else None,
        "score_gain_matched": matched_gain(calls or [], 2),
        "zero_std_share": mean_of(logs, ZERO_STD_LOG),
        "reward_per_step": rewards,
        "train_loss": last_of(logs, "loss"),
    }

"""Probe: does GRPO's mean reward rise after a short SFT, and what gives it a signal?

    python experiments/rl_signal_probe.py TEMPERATURE GENERATIONS PROMPTS STEPS   # e.g. 1.5 8 16 100

SFT 40 steps (LoRA r16, lr 5e-4), then GRPO (LoRA r4, lr 1e-3, beta 0) with the given sampling
temperature, generations per prompt and prompts per step, through the real pipeline. Prints the
ID/OOD curve and the mean sampled reward of the first vs last 10 RL steps. One thread.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch

    from stagebudget.pipeline import run_schedule
    from stagebudget.schedule import Schedule, StageSpec

    torch.set_num_threads(1)
    temp, gens, prompts, steps = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    schedule = Schedule(stages=(
        StageSpec(kind="sft", steps=40, lora_rank=16, learning_rate=5e-4, eval_interval=40),
        StageSpec(kind="rl", steps=steps, lora_rank=4, learning_rate=1e-3, batch_size=prompts,
                  num_generations=gens, temperature=temp, eval_interval=50)))
    result = run_schedule(schedule, None, device="cpu")
    rl = next(s for s in result.metrics["stages"] if s["kind"] == "rl")
    print(json.dumps({
        "temperature": temp, "generations": gens, "prompts": prompts,
        "curve": [(c["stage"], c["step"], c["id_accuracy"], c["ood_accuracy"]) for c in result.curves],
        "reward_first": rl.get("reward_first"), "reward_last": rl.get("reward_last")}))


if __name__ == "__main__":
    main()

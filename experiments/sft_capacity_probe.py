"""Probe: how far does SFT alone move ID and OOD, by adapter capacity and learning rate?

    python experiments/sft_capacity_probe.py RANK LR STEPS     # e.g. 0 5e-4 400 (rank 0 = full FT)

Trains one SFT-only schedule through the real pipeline (TRL SFTTrainer, PEFT LoRA) on the
embedded default, evaluating ID/OOD every 50 steps, and prints the curve. One thread, so two
probes can run side by side on a 2-core machine.
"""

from __future__ import annotations

import sys


def main() -> None:
    import torch

    from stagebudget.pipeline import run_schedule
    from stagebudget.schedule import Schedule, StageSpec

    torch.set_num_threads(1)
    rank, lr, steps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    schedule = Schedule(stages=(StageSpec(kind="sft", steps=steps, lora_rank=rank,
                                          learning_rate=lr, eval_interval=50),))
    result = run_schedule(schedule, None, device="cpu")
    print(f"rank {rank} lr {lr}:",
          [(c["step"], c["id_accuracy"], c["ood_accuracy"]) for c in result.curves])


if __name__ == "__main__":
    main()

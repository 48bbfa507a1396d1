"""Training-speed benchmark: every number is a ratio against a baseline measured in this run.

    python bench/bench_stages.py [--base builtin:tiny] [--steps 8]

Baselines (same model, same batch, same machine, same process):
- a plain PyTorch loop (forward/backward/AdamW on the answer tokens) for SFT-style steps;
- plain sampling generation of the same prompts x generations for GRPO steps;
- the analytic cost model, against which the measured cost is reported (planner accuracy).
No timing is asserted anywhere; this prints, it does not judge.
"""

from __future__ import annotations

import argparse
import statistics
import time


def plain_loop_seconds(model_path, suite, batch: int, steps: int) -> float:
    """Median seconds per step of a hand-written full fine-tuning loop: the floor TRL pays over."""
    import torch

    from stagebudget.training.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_path)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    texts = [e.prompt + e.answer + tok.eos_token for e in suite.train[: batch * (steps + 1)]]
    times = []
    tok.padding_side = "right"
    for i in range(steps + 1):
        enc = tok(texts[i * batch:(i + 1) * batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        t0 = time.perf_counter()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def generation_seconds(model_path, suite, prompts: int, gens: int, new_tokens: int, reps: int) -> float:
    """Median seconds to sample ``prompts x gens`` completions: the floor a GRPO step pays."""
    import torch

    from stagebudget.training.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_path)
    batch = [e.prompt for e in suite.train[:prompts] for _ in range(gens)]
    times = []
    for _ in range(reps + 1):
        enc = tok(batch, return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=tok.pad_token_id)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="builtin:tiny")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    import torch

    from stagebudget.kinds import get_kind
    from stagebudget.modelref import resolve_base_model
    from stagebudget.plan.cost import CostModel, ModelShape
    from stagebudget.schedule import StageSpec
    from stagebudget.tasks import load_suite
    from stagebudget.training.calibrate import RL_PROMPTS, SFT_BATCH, calibrate

    rl_defaults = get_kind("rl").defaults
    RL_GENERATIONS, RL_COMPLETION = rl_defaults["num_generations"], rl_defaults["max_completion_length"]

    torch.manual_seed(0)
    path = resolve_base_model(args.base)
    suite = load_suite(n_train=2048, n_id_test=1, n_ood_test=1)
    print(f"base {args.base}; torch threads {torch.get_num_threads()}; steps timed {args.steps}")
    plain = plain_loop_seconds(path, suite, SFT_BATCH, args.steps)
    gen = generation_seconds(path, suite, RL_PROMPTS, RL_GENERATIONS, RL_COMPLETION, max(2, args.steps // 2))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        measured = calibrate(args.base, kinds=("sft", "rl"), ranks=(0, 4, 16), steps=args.steps,
                             out=Path(tmp) / "table.json")
    analytic = CostModel.analytic(ModelShape.for_ref(args.base))
    print(f"\nbaseline plain torch loop (full FT, batch {SFT_BATCH}): {plain:.3f} s/step")
    print(f"baseline sampling {RL_PROMPTS}x{RL_GENERATIONS} x {RL_COMPLETION} tokens: {gen:.3f} s")
    print(f"\n{'stage':>5} {'rank':>4} {'s/step':>7}  {'vs baseline':>11}  {'analytic/measured':>17}")
    for e in measured.table:
        base = plain if e["kind"] == "sft" else gen
        rl = ({"num_generations": e["num_generations"],
               "max_completion_length": e["max_completion_length"]} if e["kind"] == "rl" else {})
        spec = StageSpec(kind=e["kind"], steps=1, lora_rank=e["rank"], batch_size=e["batch"], **rl)
        est = analytic.step_seconds(spec)
        print(f"{e['kind']:>5} {e['rank']:>4} {e['seconds_per_step']:7.3f}  "
              f"{e['seconds_per_step'] / base:10.2f}x  {est / e['seconds_per_step']:16.2f}x")
    print("\n'vs baseline': SFT steps against the plain loop (>1 = TRL/PEFT overhead);"
          " GRPO steps against generation alone (>1 = scoring + training on top of sampling).")


if __name__ == "__main__":
    main()

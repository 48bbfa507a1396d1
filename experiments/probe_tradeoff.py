"""Probe: does SFT on the ID split of DEFAULT_TASKS raise ID and erode OOD?

Full-parameter fine-tuning of the tiny base on ID train examples (loss on the answer
only), greedy ID/OOD evaluation every ``--eval-every`` steps. Prints one JSON line per
evaluation. Usage: ``python experiments/probe_tradeoff.py [--base DIR] [--steps 300]``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, default=None,
                        help="base model dir (default: build tiny)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from stagebudget.basemodel import build_base, greedy_generate, load_model_and_tokenizer
    from stagebudget.tasks import load_suite

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    base = args.base or build_base("tiny", progress=print)
    model, tok = load_model_and_tokenizer(base)
    suite = load_suite(n_train=4000, n_id_test=200, n_ood_test=200, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)

    def evaluate(step: int) -> None:
        row: dict[str, object] = {"step": step}
        for split in ("id_test", "ood_test"):
            exs = suite.split(split)
            preds = greedy_generate(model, tok, [e.prompt for e in exs], 12)
            scores = [suite.score(e, p) for e, p in zip(exs, preds, strict=True)]
            row[split] = round(sum(scores) / len(scores), 3)
            for task in suite.tasks:
                mine = [s for e, s in zip(exs, scores, strict=True) if e.task == task]
                row[f"{split}:{task}"] = round(sum(mine) / len(mine), 3)
        print(json.dumps(row), flush=True)

    evaluate(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = rng.sample(suite.train, args.batch)
        seqs, labels = [], []
        for ex in batch:
            prompt = tok(ex.prompt)["input_ids"]
            answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % args.eval_every == 0:
            evaluate(step)
    print(json.dumps({"train_seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()

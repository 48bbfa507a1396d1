"""Write ``tasks.jsonl``: a chat task (DNA reverse complement) with answers in ``<answer>`` tags.

Each row is TRL's conversational prompt format plus stagebudget's fields::

    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
     "completion": "<answer>TACGT</answer>", "answer": "TACGT", "split": "train"}

``completion`` is what SFT teaches the model to write; ``answer`` is what the scorer compares
the extracted answer with. ID: 4-6 bases; OOD: 7-8 bases (longer than any training example).

    python examples/own_model/make_tasks.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are a molecular biologist. Reply with the answer inside <answer></answer> tags."
SIZES = {"train": 300, "id_test": 40, "ood_test": 40}


def reverse_complement(seq: str) -> str:
    """``reverse_complement("AAGC") == "GCTT"``."""
    return seq[::-1].translate(str.maketrans("ACGT", "TGCA"))


def rows(seed: int = 0) -> list[dict]:
    """Distinct prompts per split; no test prompt appears in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for split, n in SIZES.items():
        lengths = (7, 8) if split == "ood_test" else (4, 5, 6)
        while sum(r["split"] == split for r in out) < n:
            seq = "".join(rng.choice("ACGT") for _ in range(rng.choice(lengths)))
            if seq in seen:
                continue
            seen.add(seq)
            answer = reverse_complement(seq)
            out.append({"prompt": [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": f"Reverse complement of {seq}"}],
                        "completion": f"<answer>{answer}</answer>", "answer": answer,
                        "split": split})
    return out


if __name__ == "__main__":
    path = HERE / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {path}")

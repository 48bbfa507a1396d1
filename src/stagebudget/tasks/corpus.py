"""The pre-training corpus of the built-in base: raw chunks of the real sequences and built-in
task examples under all their rule variants (train pools only).
"""

from __future__ import annotations

import random

from stagebudget.schedule import CPT_CORPORA
from stagebudget.tasks import data
from stagebudget.tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS

# ---------------------------------------------------------------- pre-training corpus
RAW_SOURCES = ("ecoli_genome", "cdip_genome", "hgc_genome", "ecoli_cds", "myco_cds",
               "proteome", "ecoli_prot")


# Shares of the default tasks in the pre-training corpus: translation (four genetic codes) is
# learnt several times slower than the base-by-base strand and charge rules, so it gets more.
# Each OOD rule variant is seen this many times as often as each ID variant: the base knows the
# OOD rules well and the ID rules less, so SFT on ID has room to learn and OOD has something to
# lose (the trade-off the tool navigates needs both; chosen for that, not for a result).
OOD_WEIGHT = 2.0


PRETRAIN_WEIGHTS = tuple(2.0 if name == "translate" else 1.0 for name in DEFAULT_TASKS)


def pretrain_corpus(seed: int = 0, n: int = 30000, corpus: str = CPT_CORPORA[0]) -> list[str]:
    """Texts for base pre-training (and cpt), ``n`` of them.

    ``"mixture"`` (the base's own pre-training corpus): about 5% raw 16-30 char chunks of real
    DNA and protein, 90% default-task examples and 5% other built-in tasks, each task under ALL
    its variants (ID and OOD rules, equally often), drawn from the train pool only, as
    ``prompt + answer`` strings. ``"raw"``: raw chunks alone, no task example (a cpt stage on
    it sees the sequences but no task and no rule).
    """
    if corpus not in CPT_CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; the corpora are {', '.join(CPT_CORPORA)}")
    if corpus == "raw":
        rng = random.Random(f"{seed}:raw")
        return [_raw_chunk(rng) for _ in range(n)]
    rng = random.Random(f"{seed}:pretrain")
    n_raw, n_default = n // 20, int(n * 0.9)
    texts = [_raw_chunk(rng) for _ in range(n_raw)]
    others = [t for t in BUILTIN_TASKS if t not in DEFAULT_TASKS]
    for count, pool_names, weights in ((n_default, DEFAULT_TASKS, PRETRAIN_WEIGHTS),
                                       (n - n_raw - n_default, others, None)):
        for _ in range(count):
            task = BUILTIN_TASKS[rng.choices(pool_names, weights)[0]]
            variants = (*task.id_variants, *task.ood_variants)
            idx = rng.choices(range(len(variants)),
                              [1.0] * len(task.id_variants) + [OOD_WEIGHT] * len(task.ood_variants))[0]
            got = None
            while got is None:  # redraw the same variant: OOD draws are rejected more often
                got = task.draw(rng, variants[idx], "train", idx >= len(task.id_variants))
            texts.append(got[0] + got[1])
    rng.shuffle(texts)
    return texts


def _raw_chunk(rng: random.Random) -> str:
    recs = data.pool(rng.choice(RAW_SOURCES), "train")
    rec = recs[rng.randrange(len(recs))]
    length = min(len(rec), rng.randint(16, 30))
    start = rng.randrange(len(rec) - length + 1)
    return rec[start:start + length]

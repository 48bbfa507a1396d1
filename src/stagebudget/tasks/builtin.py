"""The built-in biology tasks: real sequences, labels from real biological rules.

Every prompt is ``"<rule>:<sequence>="``; the rule prefix names the task and, for
rule-named tasks, the variant (genetic code, strand operation, pH, enzyme, scale).
A task has ID variants (used by train and id_test) and OOD variants (ood_test only);
the base model's pre-training corpus holds all of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from stagebudget.tasks import data

DNA_COMP = str.maketrans("ACGT", "TGCA")
AMINO = "ACDEFGHIKLMNPQRSTVWY"

# Lengths of the default tasks, drawn uniformly per example: graded difficulty, so that a
# model's success varies from prompt to prompt (GRPO learns only from groups whose rewards
# differ) and short prompts are learnt before long ones.
TRANSLATE_CODONS = (1, 5)
STRAND_NT = (4, 12)
CHARGE_AA = (4, 12)

# (prompt, answer) or None when the drawn window is rejected
Draw = tuple[str, str] | None


@dataclass(frozen=True)
class Variant:
    """One way to pose a task: a rule value and the sources its sequences come from."""

    rule: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: metadata, its ID/OOD variants and a sampler for one example."""

    name: str
    domain: str
    description: str
    id_split: str
    ood_split: str
    scorer: str
    id_variants: tuple[Variant, ...]
    ood_variants: tuple[Variant, ...]
    draw: Callable[[random.Random, Variant, str, bool], Draw]


def _window(rng: random.Random, source: str, part: str, length: int, step: int = 1) -> str:
    recs = data.pool(source, part)
    for _ in range(50):
        rec = recs[rng.randrange(len(recs))]
        if len(rec) >= length:
            start = step * rng.randrange((len(rec) - length) // step + 1)
            return rec[start:start + length]
    raise RuntimeError(f"no record of length >= {length} in {source!r}")


def _revcomp(dna: str) -> str:
    return dna.translate(DNA_COMP)[::-1]


# ---------------------------------------------------------------- genetic codes
@cache
def codon_table(code: int) -> dict[str, str]:
    """Codon -> one-letter amino acid (``*`` for stop) for an NCBI genetic code."""
    from Bio.Data import CodonTable

    table = CodonTable.unambiguous_dna_by_id[code]
    out = dict(table.forward_table)
    out.update({c: "*" for c in table.stop_codons})
    return out


def translate(dna: str, code: int) -> str:
    """Translate whole codons of ``dna`` under NCBI genetic code ``code``."""
    table = codon_table(code)
    return "".join(table.get(dna[i:i + 3], "X") for i in range(0, len(dna) - 2, 3))


def _draw_translate(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    code = int(v.rule)
    source = rng.choice(v.sources)
    step = 1 if source.endswith("genome") else 3  # CDS windows stay in frame
    dna = _window(rng, source, part, 3 * rng.randint(*TRANSLATE_CODONS), step=step)
    if set(dna) - set("ACGT"):
        return None
    protein = translate(dna, code)
    if ood and protein == translate(dna, 1):
        return None  # every OOD prompt holds a codon whose meaning differs from code 1
    return f"tl{code}:{dna.lower()}=", protein


def _draw_stop(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    code = int(v.rule)
    dna = _window(rng, rng.choice(v.sources), part, 3 * rng.randint(4, 6))
    if set(dna) - set("ACGT"):
        return None
    answer = str(first_stop(dna, code))
    if ood and answer == str(first_stop(dna, 11)):
        return None
    if answer == "0" and rng.random() < 0.85:
        return None  # keep "no stop" from dominating the answers
    return f"sp{code}:{dna}=", answer


def first_stop(dna: str, code: int) -> int:
    """1-based index of the first in-frame stop codon under ``code``; 0 when none."""
    protein = translate(dna, code)
    return protein.index("*") + 1 if "*" in protein else 0


# ---------------------------------------------------------------- strands
def strand_op(op: str, dna: str) -> str:
    """A strand operation on ``dna``, every result aligned base by base with its input:

    ``cm`` the complementary DNA strand (written 3'->5'); ``tx`` the mRNA transcribed from a
    coding strand (U for T); ``rt`` the mRNA transcribed from a template strand written 3'->5'
    (the complement, U for T). ``rc`` (reverse complement) is kept for other uses.

    >>> [strand_op(op, "ATGC") for op in ("cm", "tx", "rt", "rc")]
    ['TACG', 'AUGC', 'UACG', 'GCAT']
    """
    if op == "cm":
        return dna.translate(DNA_COMP)
    if op == "tx":
        return dna.replace("T", "U")
    if op == "rt":
        return dna.translate(DNA_COMP).replace("T", "U")
    if op == "rc":
        return _revcomp(dna)
    raise ValueError(f"unknown strand operation {op!r}; allowed: cm, tx, rt, rc")


def _draw_strand(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    dna = _window(rng, rng.choice(v.sources), part, rng.randint(*STRAND_NT))
    if set(dna) - set("ACGT"):
        return None
    return f"{v.rule}:{dna.lower()}=", strand_op(v.rule, dna)


def _draw_antisense(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    rna = _window(rng, rng.choice(v.sources), part, rng.randint(7, 10)).replace("T", "U")
    if set(rna) - set("ACGU"):
        return None
    return f"as:{rna}=", rna.translate(str.maketrans("ACGU", "UGCA"))[::-1]


def _draw_gc(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    dna = _window(rng, rng.choice(v.sources), part, rng.randint(8, 12))
    if set(dna) - set("ACGT"):
        return None
    return f"gc:{dna}=", str(dna.count("G") + dna.count("C"))


# ---------------------------------------------------------------- restriction
ENZYMES_ID = ("AluI", "HaeIII", "MspI", "TaqI")
ENZYMES_OOD = ("MboI", "RsaI", "HhaI", "MseI")


@cache
def enzyme_site(name: str) -> str:
    """Recognition site of a restriction enzyme, from Bio.Restriction."""
    from Bio import Restriction

    return str(getattr(Restriction, name).site)


def site_position(dna: str, enzyme: str) -> int:
    """1-based start of the first recognition site of ``enzyme`` in ``dna``; 0 when none."""
    return dna.find(enzyme_site(enzyme)) + 1


def _draw_restriction(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    site, length = enzyme_site(v.rule), 12
    want_hit = rng.random() < 0.75
    for _ in range(8):  # look for a block holding the site when one is wanted
        block = _window(rng, rng.choice(v.sources), part, data.BLOCK)
        hits = [i for i in range(len(block) - len(site) + 1) if block.startswith(site, i)]
        if hits or not want_hit:
            break
    if hits and want_hit:
        hit = rng.choice(hits)
        lo, hi = max(0, hit + len(site) - length), min(hit, len(block) - length)
        start = rng.randint(lo, hi)
    else:
        start = rng.randrange(len(block) - length + 1)
    dna = block[start:start + length]
    if set(dna) - set("ACGT"):
        return None
    return f"re{v.rule.lower()}:{dna}=", str(site_position(dna, v.rule))


# ---------------------------------------------------------------- proteins
def _peptide(rng: random.Random, v: Variant, part: str, lo: int, hi: int) -> str | None:
    pep = _window(rng, rng.choice(v.sources), part, rng.randint(lo, hi))
    return None if set(pep) - set(AMINO) else pep


def residue_charge(residue: str, ph: float) -> str:
    """Side-chain charge sign at ``ph`` with Bio.SeqUtils.IsoelectricPoint pKa values:
    ``+`` for a base whose pKa is above the pH, ``-`` for an acid whose pKa is below it."""
    from Bio.SeqUtils import IsoelectricPoint as ip

    if residue in ip.positive_pKs and ip.positive_pKs[residue] > ph:
        return "+"
    if residue in ip.negative_pKs and ip.negative_pKs[residue] < ph:
        return "-"
    return "0"


def charge_string(peptide: str, ph: float) -> str:
    """Per-residue side-chain charge signs, e.g. ``charge_string("MKD", 7) == "0+-"``."""
    return "".join(residue_charge(r, ph) for r in peptide)


def _draw_charge(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    pep = _peptide(rng, v, part, *CHARGE_AA)
    if pep is None:
        return None
    answer = charge_string(pep, float(v.rule))
    if ood and answer == charge_string(pep, 7.0):
        return None
    return f"ch{v.rule}:{pep}=", answer


def sequons(peptide: str) -> list[int]:
    """1-based positions of N-glycosylation sequons N-X-S/T with X not P."""
    return [i + 1 for i in range(len(peptide) - 2)
            if peptide[i] == "N" and peptide[i + 1] != "P" and peptide[i + 2] in "ST"]


def _draw_sequon(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    pep = _peptide(rng, v, part, 8, 12)
    if pep is None:
        return None
    found = sequons(pep)
    if not found and rng.random() < 0.7:
        return None
    return f"ng:{pep}=", ",".join(map(str, found)) or "-"


@cache
def hydro_scale(name: str) -> dict[str, float]:
    """A hydropathy scale from Bio.SeqUtils.ProtParamData (``kd`` or ``hw``)."""
    from Bio.SeqUtils import ProtParamData

    return dict(getattr(ProtParamData, name))


def mean_hydropathy(peptide: str, scale: str) -> str:
    """Mean scale value over the peptide, to one decimal (e.g. ``"-0.4"``)."""
    table = hydro_scale(scale)
    value = round(sum(table[r] for r in peptide) / len(peptide), 1)
    return f"{value + 0.0:.1f}"  # + 0.0 turns -0.0 into 0.0


def _draw_hydro(rng: random.Random, v: Variant, part: str, ood: bool) -> Draw:
    pep = _peptide(rng, v, part, 5, 7)
    if pep is None:
        return None
    return f"hy{v.rule}:{pep}=", mean_hydropathy(pep, v.rule)


# ---------------------------------------------------------------- registry
ECOLI_MYCO = ("ecoli_cds", "myco_cds")
# coding windows plus genome windows in any frame (these also hold TGA and other stops)
CODING_AND_FRAMES = ("ecoli_cds", "myco_cds", "ecoli_genome")
GENOMES = ("ecoli_genome", "cdip_genome")

BUILTIN_TASKS: dict[str, BuiltinTask] = {t.name: t for t in (
    BuiltinTask(
        "translate", "transcriptomics",
        "Translate 1-5 codons of real CDS or genome under the NCBI genetic code named in the "
        "prompt.",
        "genetic codes 1 and 11 (E. coli and Mycoplasma-like CDS windows, E. coli genome frames)",
        "genetic codes 2 and 4; every prompt holds a codon whose meaning differs from code 1",
        "exact",
        (Variant("1", CODING_AND_FRAMES), Variant("11", CODING_AND_FRAMES)),
        (Variant("2", CODING_AND_FRAMES), Variant("4", ("myco_cds", "ecoli_genome"))),
        _draw_translate),
    BuiltinTask(
        "strand", "genomics",
        "Apply the strand operation named in the prompt to 4-12 nt of real genome, base by base: "
        "cm = complementary DNA strand (3'->5'), tx = mRNA from the coding strand, rt = mRNA "
        "from the template strand given 3'->5'.",
        "operations cm and tx",
        "operation rt (complement, U for T), never trained; it conflicts with both ID rules",
        "exact",
        (Variant("cm", GENOMES), Variant("tx", GENOMES)),
        (Variant("rt", GENOMES),),
        _draw_strand),
    BuiltinTask(
        "charge", "proteins",
        "Per-residue side-chain charge sign (+, -, 0) of a 4-12 aa real protein window at the pH "
        "named in the prompt (Bio.SeqUtils.IsoelectricPoint pKa values).",
        "pH 7 and 8",
        "pH 5 and 11; every prompt holds a residue whose charge differs from pH 7",
        "exact",
        (Variant("7", ("proteome",)), Variant("8", ("proteome",))),
        (Variant("5", ("proteome",)), Variant("11", ("proteome",))),
        _draw_charge),
    BuiltinTask(
        "gc_count", "genomics",
        "Number of G and C bases in 8-12 nt of real genome.",
        "E. coli and C. diphtheriae genome windows",
        "held-out high-GC organism (KK037166, 66% GC)",
        "numeric",
        (Variant("", GENOMES),), (Variant("", ("hgc_genome",)),),
        _draw_gc),
    BuiltinTask(
        "restriction", "genomics",
        "1-based start of the first recognition site of the named restriction enzyme in 12 nt of "
        "real genome (0 when absent).",
        f"enzymes {', '.join(ENZYMES_ID)}",
        f"enzymes {', '.join(ENZYMES_OOD)}, never trained",
        "exact",
        tuple(Variant(e, GENOMES) for e in ENZYMES_ID),
        tuple(Variant(e, GENOMES) for e in ENZYMES_OOD),
        _draw_restriction),
    BuiltinTask(
        "stop", "transcriptomics",
        "1-based index of the first in-frame stop codon in 4-6 codons of real genome under the "
        "named genetic code (0 when none).",
        "genetic codes 1 and 11",
        "genetic code 4 (TGA is Trp); the answer always differs from code 11",
        "exact",
        (Variant("1", GENOMES), Variant("11", GENOMES)),
        (Variant("4", GENOMES),),
        _draw_stop),
    BuiltinTask(
        "antisense", "transcriptomics",
        "Antisense RNA (reverse complement, U alphabet) of 7-10 nt of a real mRNA.",
        "E. coli and Mycoplasma-like CDS windows",
        "held-out high-GC organism (KK037166 genome windows)",
        "per_position",
        (Variant("", ECOLI_MYCO),), (Variant("", ("hgc_genome",)),),
        _draw_antisense),
    BuiltinTask(
        "sequon", "proteins",
        "1-based positions of N-glycosylation sequons (N-X-S/T, X not P) in 8-12 aa of real "
        "protein, comma-separated ('-' when none).",
        "proteome of 938293 (pyhmmer test data)",
        "held-out organism (E. coli MIIJ01000039 proteins)",
        "set_f1",
        (Variant("", ("proteome",)),), (Variant("", ("ecoli_prot",)),),
        _draw_sequon),
    BuiltinTask(
        "hydropathy", "proteins",
        "Mean hydropathy of 5-7 aa of real protein on the scale named in the prompt, 1 decimal.",
        "Kyte-Doolittle scale (kd)",
        "Hopp-Woods scale (hw), never trained",
        "numeric",
        (Variant("kd", ("proteome",)),), (Variant("hw", ("proteome",)),),
        _draw_hydro),
)}

DEFAULT_TASKS: tuple[str, ...] = ("translate", "strand", "charge")

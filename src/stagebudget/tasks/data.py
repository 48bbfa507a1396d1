"""Real sequences shipped inside installed wheels, loaded once and partitioned.

Every record (a gene, a protein, a genome block) belongs to exactly one *pool*:
``"train"`` or ``"test"``, decided by a fixed hash of its index, independent of
any seed. Train examples (and the pre-training corpus) draw only from the train
pool and test examples only from the test pool, so splits never share a source
record.
"""

from __future__ import annotations

import gzip
import zlib
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from stagebudget.errors import DataMissingError

BLOCK = 240  # genome blocks: windows never cross a block, so pools stay disjoint
TEST_POOL_PERCENT = 20

# source name -> (package, relative path, kind)
SOURCES: dict[str, tuple[str, str, str]] = {
    # E. coli contig (taxon 562), low-ish GC, gene calls translate 400/400 with code 11
    "ecoli_cds": ("pyrodigal", "tests/data/MIIJ01000039.single.fna.gz", "records"),
    "ecoli_genome": ("pyrodigal", "tests/data/MIIJ01000039.fna.gz", "blocks"),
    "ecoli_prot": ("pyrodigal", "tests/data/MIIJ01000039.single.faa.gz", "records"),
    # SRR492066: a Mycoplasma-like contig; meta-mode gene calls use code 4 (TGA = Trp)
    "myco_cds": ("pyrodigal", "tests/data/SRR492066.meta.fna.gz", "records"),
    # KK037166: a high-GC (66%) actinobacterial contig
    "hgc_genome": ("pyrodigal", "tests/data/KK037166.fna.gz", "blocks"),
    "hgc_prot": ("pyrodigal", "tests/data/KK037166.single.faa.gz", "records"),
    # C. diphtheriae NCTC11397, first 100 kb
    "cdip_genome": ("pyrodigal", "tests/data/GCF_001457455.1_NCTC11397_genomic_100kb.fna.gz",
                    "blocks"),
    # a 2,100-protein proteome from pyhmmer's test data
    "proteome": ("pyhmmer", "tests/data/seqs/938293.PRJEB85.HG003687.faa", "records"),
}


def _path(source: str) -> Path:
    package, rel, _ = SOURCES[source]
    spec = find_spec(package)
    if spec is None or spec.origin is None:
        raise DataMissingError(
            f"package {package!r} is not installed; it ships the {source!r} data")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise DataMissingError(f"sequence file {path} is missing from the {package!r} wheel")
    return path


def _read_fasta(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    seqs: list[str] = []
    parts: list[str] = []
    with opener(path, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                if parts:
                    seqs.append("".join(parts).upper())
                parts = []
            else:
                parts.append(line.strip())
    if parts:
        seqs.append("".join(parts).upper())
    return seqs


@cache
def records(source: str) -> tuple[str, ...]:
    """All records of one source (genes, proteins, or fixed-size genome blocks)."""
    seqs = _read_fasta(_path(source))
    if SOURCES[source][2] == "blocks":
        seqs = [s[i:i + BLOCK] for s in seqs for i in range(0, len(s) - BLOCK + 1, BLOCK)]
    # trailing stop marks in .faa files are not part of the protein
    return tuple(s.rstrip("*") for s in seqs)


def _is_test(index: int) -> bool:
    return zlib.crc32(str(index).encode()) % 100 < TEST_POOL_PERCENT


@cache
def pool(source: str, part: str) -> tuple[str, ...]:
    """Records of ``source`` in pool ``part`` ("train" or "test"); fixed, seed-free."""
    want_test = part == "test"
    return tuple(r for i, r in enumerate(records(source)) if _is_test(i) == want_test)

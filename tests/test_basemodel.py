"""Tests for the tokenizer, the base-model build/cache and model references."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from reference_generate import generate_greedy
from stagebudget.modelref import (
    CHARS,
    SHIPPED_DIR,
    ModelRefError,
    cache_problem,
    resolve_base_model,
    same_weights,
    ship_base,
)
from stagebudget.paths import default_cache_dir
from stagebudget.tasks import load_suite, pretrain_corpus
from stagebudget.training.model import (
    build_base,
    build_tokenizer,
    load_model_and_tokenizer,
)


def test_tokenizer_adds_bos_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.padding_side == "left"
    ids = tok("tl11:ATG=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("tl11:ATG=")
    assert tok.decode(tok(CHARS)["input_ids"], skip_special_tokens=True) == CHARS
    suite = load_suite(n_train=90, n_id_test=30, n_ood_test=30)
    texts = [e.prompt + e.answer for e in suite.train + suite.ood_test] + pretrain_corpus(n=200)
    for text in texts:
        enc = tok(text)["input_ids"]
        assert tok.unk_token_id not in enc
        assert tok.decode(enc, skip_special_tokens=True) == text
    batch = tok(["ab", "abcd"], padding=True)["input_ids"]
    assert batch[0][:2] == [tok.pad_token_id] * 2  # left padding


def test_build_base_is_loadable_and_cached(tiny_base):
    assert (tiny_base / "model.safetensors").is_file()
    info = json.loads((tiny_base / "base_info.json").read_text())
    want = {"params", "steps", "heldout_lm_loss", "base_id_accuracy", "base_ood_accuracy"}
    assert want <= set(info)
    model, tok = load_model_and_tokenizer(tiny_base)
    out = generate_greedy(model, tok, ["tl11:ATGTGG=", "rc:ACGT="], max_new_tokens=4)
    assert len(out) == 2 and all(len(o) <= 4 for o in out)
    start = time.perf_counter()
    again = build_base("test", cache_dir=tiny_base.parent)
    assert again == tiny_base and time.perf_counter() - start < 1.0
    assert resolve_base_model(str(tiny_base)) == tiny_base
    assert resolve_base_model("builtin:test") == SHIPPED_DIR / "test"  # never the build


@pytest.mark.parametrize("size", ["tiny", "test"])
def test_the_builtin_bases_are_shipped_and_checked(size):
    """builtin:SIZE is package data with the SHA-256s of its files in base_info.json: the same
    bytes on every machine, nothing built."""
    path = resolve_base_model(f"builtin:{size}")
    assert path == SHIPPED_DIR / size and cache_problem(path) is None
    info = json.loads((path / "base_info.json").read_text())
    assert info["size"] == size and set(info["sha256"]) >= {"model.safetensors", "tokenizer.json"}
    assert {"cpu_capability", "versions"} <= set(info["built_with"])


def test_a_damaged_shipped_base_is_refused_and_a_missing_one_explained(tmp_path, monkeypatch):
    from stagebudget import modelref

    shutil.copytree(SHIPPED_DIR / "test", tmp_path / "test")
    monkeypatch.setattr(modelref, "SHIPPED_DIR", tmp_path)
    assert resolve_base_model("builtin:test") == tmp_path / "test"
    weights = tmp_path / "test" / "model.safetensors"
    good = weights.read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    weights.write_bytes(good[:header] + b"\0" * (len(good) - header))  # zeroed weights
    with pytest.raises(ModelRefError, match=r"shipped builtin:test .* is damaged .*checksum.*reinstall"):
        resolve_base_model("builtin:test")
    with pytest.raises(ModelRefError, match=r"builtin:tiny is not in this installation.*base build"):
        resolve_base_model("builtin:tiny")


def test_ship_base_replaces_the_shipped_copy_only_when_asked(tiny_base, tmp_path, monkeypatch):
    from stagebudget import modelref

    monkeypatch.setattr(modelref, "SHIPPED_DIR", tmp_path)
    assert not same_weights(tiny_base, SHIPPED_DIR / "tiny")
    shipped = ship_base(tiny_base, "test")
    assert shipped == tmp_path / "test" and same_weights(shipped, tiny_base)
    assert resolve_base_model("builtin:test") == shipped
    assert not (shipped / "COMPLETE").exists()


@pytest.mark.slow
def test_the_shipped_tiny_base_scores_here_what_base_info_records():
    """The shipped weights evaluated on this machine: within 2 standard errors of the ID/OOD
    accuracy recorded where they were made (greedy decoding is deterministic per machine, but
    other CPU kernels may flip a few near-ties)."""
    from stagebudget.training.model import EVAL_SIZES, _base_accuracy

    path = resolve_base_model("builtin:tiny")
    info = json.loads((path / "base_info.json").read_text())
    model, tok = load_model_and_tokenizer(path)
    now = _base_accuracy(model, tok, "tiny")
    assert EVAL_SIZES["tiny"] == (1000, 1000)
    for key in ("id", "ood"):
        recorded, se = info[f"base_{key}_accuracy"], info[f"base_{key}_accuracy_se"]
        assert abs(now[f"base_{key}_accuracy"] - recorded) <= 2 * se, (key, now, recorded)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STAGEBUDGET_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_resolve_errors(tmp_path):
    with pytest.raises(ModelRefError, match="does not exist"):
        resolve_base_model(str(tmp_path / "missing"))
    with pytest.raises(ModelRefError, match=r"never\s+downloads"):
        resolve_base_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(ModelRefError, match="allowed: builtin:tiny"):
        resolve_base_model("builtin:huge")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelRefError, match=r"no \*\.safetensors"):
        resolve_base_model(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelRefError, match="convert them to safetensors"):
        resolve_base_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelRefError, match="no tokenizer"):
        resolve_base_model(str(tmp_path))


def test_checking_a_cached_base_does_not_import_torch(tiny_base):
    """The search driver checks the cached base before Ray starts: reading safetensors headers
    must not cost a torch import (3 s, measured by bench/overhead.py)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from pathlib import Path\n"
            "from stagebudget.basemodel import resolve_base_model\n"
            "resolve_base_model('builtin:test')\n"
            "resolve_base_model(sys.argv[1])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code, str(tiny_base)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

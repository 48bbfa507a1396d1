"""Tests for the tokenizer, the base-model build/cache and model references."""

from __future__ import annotations

import json
import time

import pytest

from stagebudget.basemodel import (
    CHARS,
    ModelRefError,
    build_base,
    build_tokenizer,
    default_cache_dir,
    greedy_generate,
    load_model_and_tokenizer,
    resolve_base_model,
)
from stagebudget.tasks import load_suite, pretrain_corpus


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
    out = greedy_generate(model, tok, ["tl11:ATGTGG=", "rc:ACGT="], max_new_tokens=4)
    assert len(out) == 2 and all(len(o) <= 4 for o in out)
    start = time.perf_counter()
    again = build_base("test", cache_dir=tiny_base.parent)
    assert again == tiny_base and time.perf_counter() - start < 1.0
    assert resolve_base_model("builtin:test", cache_dir=tiny_base.parent) == tiny_base
    assert resolve_base_model(str(tiny_base)) == tiny_base


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
            "resolve_base_model('builtin:test', cache_dir=Path(sys.argv[1]), allow_build=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code, str(tiny_base.parent)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

"""References to base models, without torch: the built-in sizes and their configs, the shipped
bases (package data under ``builtin_models/``), model-directory checks and content digests, and
the keys cost tables are filed under.

:func:`resolve_base_model` turns ``builtin:tiny`` or a local directory into a checked path; the
code that builds, pre-trains and loads models is in :mod:`stagebudget.training.model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from stagebudget.errors import ModelRefError

COMPLETE_MARKER = "COMPLETE"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "".join(chr(c) for c in range(32, 127))  # printable ASCII covers every suite char
PROMPT_END = "="  # built-in prompts are "<rule>:<sequence>="
MAX_LEN = 128  # position budget: prompt + answer (<= 64 chars) + generation slack

# per size: model shape and pre-training recipe
SIZES: dict[str, dict[str, Any]] = {
    # 0.2M parameters; 900 steps of 64 examples learn every rule variant of the default
    # tasks part-way (base ID/OOD in base_info.json), in about a minute on 2 cores
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "intermediate_size": 192, "steps": 900, "lr": 4e-3, "batch": 64},
    "test": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "steps": 30, "lr": 3e-3, "batch": 32},
}
# the built-in bases as shipped: package data, one directory per size (see shipped_base)
SHIPPED_DIR = Path(__file__).resolve().parent / "builtin_models"


def builtin_token_count(text: str, *, bos: bool = True) -> int:
    """Tokens the built-in tokenizer gives ``text``, without loading it: one per character
    (unknown ones become ``<unk>``), plus ``<bos>`` when special tokens are added.

    >>> builtin_token_count("tl11:ATG=")
    10
    """
    return len(text) + (1 if bos else 0)


def config_dict(size: str) -> dict[str, Any]:
    """The ``LlamaConfig`` keyword arguments of the built-in model ``size`` (no torch needed)."""
    spec = SIZES[size]
    return {
        "vocab_size": len(SPECIAL_TOKENS) + len(CHARS), "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_attention_heads"],
        "max_position_embeddings": MAX_LEN, "tie_word_embeddings": True,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }


WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def position_window(ref: str, path: Path | None = None) -> int | None:
    """Positions the model can attend over: ``MAX_LEN`` for a built-in model, else its
    config.json's ``max_position_embeddings`` (or a common alias, also in ``text_config``);
    None when the config names none."""
    if ref.startswith("builtin:"):
        return MAX_LEN
    try:
        config = json.loads((Path(path or ref) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for scope in (config, config.get("text_config") or {}):
        for key in WINDOW_KEYS:
            if isinstance(scope.get(key), int) and scope[key] > 0:
                return int(scope[key])
    return None


CHECKED_FILES = ("*.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")


def weight_digests(path: Path) -> dict[str, str]:
    """SHA-256 of the weights, config and tokenizer files in ``path`` (milliseconds for the
    built-in sizes): what a trained model's content depends on."""
    out = {}
    for f in sorted({f for pattern in CHECKED_FILES for f in Path(path).glob(pattern)}):
        with f.open("rb") as fh:
            out[f.name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def model_identity(path: Path) -> dict[str, str]:
    """What a model directory's content is: the SHA-256s recorded when stagebudget built it
    (checked by :func:`cache_problem`), else those of its files now (read once per trial)."""
    info = base_info(path)
    recorded = info.get("sha256") if isinstance(info, dict) else None
    return dict(recorded) if isinstance(recorded, dict) and recorded else weight_digests(path)


def cache_problem(path: Path) -> str | None:
    """Why a cached base model cannot be used (None when it is sound). Cheap: no weights loaded.

    Checks that base_info.json is readable, each weight file has the size and SHA-256 recorded at
    build time, and each ``*.safetensors`` header opens with ``safetensors.safe_open``.
    """
    from safetensors import safe_open

    try:
        info = json.loads((path / "base_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"base_info.json unreadable: {exc}"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    recorded = info.get("files") if isinstance(info, dict) else None
    if isinstance(recorded, dict):
        for name, size in recorded.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for f in weights:
        try:
            # "numpy": only the header is read, and importing torch (3 s) is not needed here
            with safe_open(str(f), framework="numpy") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types
            return f"{f.name} is not a valid safetensors file ({exc})"
    digests = info.get("sha256") if isinstance(info, dict) else None
    if isinstance(digests, dict):
        now = weight_digests(path)
        changed = [name for name, digest in digests.items() if now.get(name) != digest]
        if changed:
            return f"{changed[0]} does not match the checksum recorded when it was built"
    return None


# ---------------------------------------------------------------- references
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_base_model(ref: str, base_dir: Path | None = None) -> Path:
    """Turn ``"builtin:tiny"``, ``"builtin:test"`` or a local directory into a model path.

    A built-in model is the one shipped inside the package (:func:`shipped_base`), the same
    bytes on every machine; a local directory must hold config.json, ``*.safetensors`` weights
    and a tokenizer. Nothing is ever built or downloaded here.
    """
    if ref.startswith("builtin:"):
        return shipped_base(ref.split(":", 1)[1])
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists():
        if _HUB_NAME.match(ref) and not ref.startswith((".", "/")):
            raise ModelRefError(
                f"base model {ref!r} looks like a Hugging Face Hub name, but stagebudget never "
                "downloads at run time; download it yourself and pass the local directory "
                "(with config.json, *.safetensors and a tokenizer), or use builtin:tiny")
        raise ModelRefError(f"base model directory {path} does not exist; pass a local "
                            "Hugging Face model directory or builtin:tiny")
    _check_model_dir(path)
    problem = cache_problem(path) if (path / "base_info.json").is_file() else None
    if problem is not None:  # a base stagebudget built: its files are checked like the shipped
        raise ModelRefError(f"the base model at {path} is damaged ({problem}); rebuild it with "
                            "`stagebudget base build --force`")
    return path


def shipped_base(size: str) -> Path:
    """The directory of the built-in base ``size`` shipped as package data, after checking its
    files against the SHA-256s in its base_info.json (:func:`cache_problem`; no torch import).

    The shipped bases were made by :func:`build_base` once; the recipe is not portable (CPU
    kernels decide where the skills form, experiments/README.md), so no machine rebuilds them.
    """
    if size not in SIZES:
        raise ModelRefError(f"unknown built-in base model builtin:{size}; allowed: "
                            f"{', '.join('builtin:' + s for s in SIZES)}")
    path = SHIPPED_DIR / size
    if not (path / "base_info.json").is_file():
        raise ModelRefError(
            f"builtin:{size} is not in this installation (expected {path}); reinstall "
            f"stagebudget, or build it with `stagebudget base build --size {size}` and pass the "
            "directory it prints as base_model")
    problem = cache_problem(path)
    if problem is not None:
        raise ModelRefError(f"the shipped builtin:{size} at {path} is damaged ({problem}); "
                            "reinstall stagebudget (pip install --force-reinstall stagebudget)")
    return path


def ship_base(built: Path, size: str) -> Path:
    """Replace the shipped ``builtin:size`` by the built base at ``built`` (maintainers only:
    every number measured on the default changes with it)."""
    problem = cache_problem(built)
    if problem is not None:
        raise ModelRefError(f"cannot ship {built}: {problem}")
    target = SHIPPED_DIR / size
    tmp = SHIPPED_DIR / f".{size}-new"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(built, tmp, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    for f in tmp.iterdir():
        os.chmod(f, 0o644)  # package data: readable by every user of the installation
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def same_weights(a: Path, b: Path) -> bool:
    """Whether two base directories hold the same weights, config and tokenizer files."""
    return weight_digests(a) == weight_digests(b)


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelRefError(f"base model {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelRefError(f"base model directory {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            raise ModelRefError(
                f"base model directory {path} holds only .bin (pickle) weights, which "
                "stagebudget refuses to load; convert them to safetensors (e.g. load the model "
                "and call save_pretrained(dir, safe_serialization=True))")
        raise ModelRefError(f"base model directory {path} has no *.safetensors weights")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise ModelRefError(f"base model directory {path} has no tokenizer "
                            "(tokenizer.json or tokenizer_config.json)")


def base_info(path: Path) -> dict[str, Any]:
    """The base_info.json of a built-in base model directory ({} when absent)."""
    info = Path(path) / "base_info.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def model_key(base_model: str) -> str:
    """``builtin:...`` as is; a local directory as its absolute path, so ``./m``, ``m`` and
    ``/abs/m`` name the same table whether calibrate, validate or search resolved them."""
    if base_model.startswith("builtin:"):
        return base_model
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local model directory, left-padding, with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer

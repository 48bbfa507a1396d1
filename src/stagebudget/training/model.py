"""The small local base model: a character tokenizer and a Llama-style causal LM.

``builtin:tiny`` and ``builtin:test`` are shipped as package data (``builtin_models/``) and
loaded after a SHA-256 check, so every machine starts from the same bytes. They were made by
:func:`build_base`: built from a config, pre-trained briefly on
:func:`stagebudget.tasks.pretrain_corpus` into a content-addressed cache directory. That
recipe is deterministic on one machine but not across CPUs (the kernels torch picks move where
the skills form), which is why the result is shipped rather than rebuilt.
torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagebudget.errors import ModelRefError
from stagebudget.modelref import (
    CHARS,
    COMPLETE_MARKER,
    MAX_LEN,
    PROMPT_END,
    SIZES,
    SPECIAL_TOKENS,
    cache_problem,
    config_dict,
    load_tokenizer,
    weight_digests,
)
from stagebudget.paths import default_cache_dir
from stagebudget.version import numerics

CODE_VERSION = "base-v3"

EVAL_SIZES = {"tiny": (1000, 1000), "test": (30, 30)}


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(out_dir: Path) -> None:
    """Save a char-level ``PreTrainedTokenizerFast`` to ``out_dir``.

    Every encoded text starts with ``<bos>`` (a TemplateProcessing post-processor), so TRL
    SFT, TRL GRPO and our evaluation tokenize prompts identically; padding is on the left.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=MAX_LEN)
    fast.save_pretrained(str(out_dir))


# ---------------------------------------------------------------- model
def _build_key(size: str, seed: int) -> str:
    spec = {"config": config_dict(size), "recipe": SIZES[size], "seed": seed,
            "corpus": {"fn": "pretrain_corpus", "n": _corpus_size(size)},
            "code": CODE_VERSION}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{size}-{digest}"


def _corpus_size(size: str) -> int:
    """One pass: every pre-training example is seen once."""
    return int(SIZES[size]["steps"] * SIZES[size]["batch"])


def build_base(size: str = "tiny", cache_dir: Path | None = None, seed: int = 0,
               force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the pre-trained base model of ``size`` and return its directory.

    The directory name hashes the config, recipe, corpus spec, seed and code version; a
    directory holding the completion marker is reused. The build writes into a temporary
    sibling directory and renames it into place, so a half-written model is never reused.
    """
    if size not in SIZES:
        raise ModelRefError(f"unknown base size {size!r}; allowed: {', '.join(SIZES)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / _build_key(size, seed)
    say = progress or (lambda _msg: None)
    if (final / COMPLETE_MARKER).is_file() and not force:
        problem = cache_problem(final)
        if problem is None:
            return final
        say(f"cached base model {final} is damaged ({problem}); rebuilding it")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
    try:
        info = _pretrain(size, seed, tmp, say)
        # sizes of the weight files, so a truncated cache entry is detected (cache_problem)
        info["files"] = {f.name: f.stat().st_size for f in sorted(tmp.glob("*.safetensors"))}
        info["sha256"] = weight_digests(tmp)  # content: zeroed weights, a broken tokenizer...
        (tmp / "base_info.json").write_text(json.dumps(info, indent=2))
        (tmp / COMPLETE_MARKER).write_text(final.name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"base model ready at {final}")
    return final


def _learnt_tokens(tokenizer: Any, text: str) -> tuple[list[int], int]:
    """Token ids of ``<bos> text <eos>`` and how many leading tokens carry no loss.

    A task example (``prompt=answer``) is learnt on its answer and EOS only, as in SFT: its
    prompt is a random sequence that the model cannot and need not predict. A raw sequence
    chunk (no ``=``) is learnt on every token but the first.
    """
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    cut = text.find(PROMPT_END) + 1
    return ids, len(tokenizer(text[:cut])["input_ids"]) if cut else 1


def _batches(tokenizer: Any, texts: list[str], batch: int, rng: random.Random) -> Any:
    """Endless ``(input_ids, attention_mask, labels)`` batches of ``batch`` random examples.

    Every pass over the corpus is a new shuffle. Two faster-looking layouts learnt the tasks
    several times slower per example: packing several examples into one row (no per-example
    attention mask) and batching examples of equal length (each batch then holds mostly one
    task). Raw chunks are no longer than task examples, so padding wastes little.
    """
    encoded = [_learnt_tokens(tokenizer, t) for t in texts]
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch + 1, batch):
            yield _padded([encoded[i] for i in order[start:start + batch]])


def _padded(rows: list[tuple[list[int], int]]) -> tuple[Any, Any, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 where no loss)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, skip) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, skip:len(ids)] = torch.tensor(ids[skip:])
        mask[row, :len(ids)] = 1
    return input_ids, mask, labels


def _pretrain(size: str, seed: int, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stagebudget.tasks import pretrain_corpus

    spec = SIZES[size]
    torch.manual_seed(seed)
    # STAGEBUDGET_THREADS overrides: on a busy machine one thread is several times faster
    torch.set_num_threads(int(os.environ.get("STAGEBUDGET_THREADS", min(2, os.cpu_count() or 1))))
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    model = LlamaForCausalLM(LlamaConfig(**config_dict(size)))
    texts = pretrain_corpus(seed=seed, n=_corpus_size(size))
    optim = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01)
    # a short warm-up, then a linear decay to 0: the decay settles the rules learnt so far
    warmup, steps = min(30, spec["steps"]), spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))
    batches = _batches(tokenizer, texts, spec["batch"], random.Random(f"{seed}:batches"))
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        input_ids, mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            say(f"pretrain step {step}/{steps} loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    info: dict[str, Any] = {
        "size": size, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
        "steps": steps, "train_seconds": round(seconds, 1), "code_version": CODE_VERSION,
        "heldout_lm_loss": round(_heldout_loss(model, tokenizer, seed), 4),
        "built_with": {**numerics(), "threads": torch.get_num_threads()},
    }
    info.update(_base_accuracy(model, tokenizer, size))
    return info


def _heldout_loss(model: Any, tokenizer: Any, seed: int, n: int = 256) -> float:
    """Mean LM loss on raw sequence chunks from the held-out (test) pool."""
    import torch

    from stagebudget.tasks import data

    rng = random.Random(f"{seed}:heldout")
    texts = []
    for _ in range(n):
        recs = data.pool(rng.choice(("ecoli_genome", "cdip_genome", "proteome")), "test")
        rec = recs[rng.randrange(len(recs))]
        start = rng.randrange(len(rec) - 48 + 1)
        texts.append(rec[start:start + 48])
    input_ids, mask, labels = _padded([_learnt_tokens(tokenizer, t) for t in texts])
    with torch.no_grad():
        return float(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss)


def _base_accuracy(model: Any, tokenizer: Any, size: str) -> dict[str, Any]:
    """Base ID/OOD accuracy with standard errors, overall and per task (base_info.json)."""
    from stagebudget.tasks import load_suite
    from stagebudget.training.evaluate import max_new_tokens_for, mean_and_se, scores

    n_id, n_ood = EVAL_SIZES[size]
    suite = load_suite(n_train=0, n_id_test=n_id, n_ood_test=n_ood, seed=0)
    out: dict[str, Any] = {"eval_suite": suite.name}
    for split, key in (("id_test", "id"), ("ood_test", "ood")):
        examples = suite.split(split)
        got = scores(model, tokenizer, suite, examples, max_new_tokens_for(suite, tokenizer))
        mean, se = mean_and_se(got)
        out[f"base_{key}_accuracy"], out[f"base_{key}_accuracy_se"] = round(mean, 4), round(se, 4)
        for task in suite.tasks:
            mine = [s for e, s in zip(examples, got, strict=True) if e.task == task]
            out[f"base_{key}_accuracy_{task}"] = round(mean_and_se(mine)[0], 4)
    return out


# ---------------------------------------------------------------- loading and generation
def load_model_and_tokenizer(path: Path, device: str = "cpu",
                             trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a causal LM (safetensors only) and its tokenizer from a local directory."""
    return (load_model(path, device, trust_remote_code),
            load_tokenizer(path, trust_remote_code=trust_remote_code))


def load_model(path: Path, device: str = "cpu", trust_remote_code: bool = False) -> Any:
    """Load a causal LM (safetensors only) from a local directory onto ``device``."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        str(path), use_safetensors=True, trust_remote_code=trust_remote_code)
    return model.to(device)


__all__ = ["build_base", "build_tokenizer", "load_model", "load_model_and_tokenizer"]

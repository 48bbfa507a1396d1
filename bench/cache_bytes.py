"""Bytes the prefix cache writes per entry kind, measured on a random-init Llama of ~130M
parameters built from a config on this CPU, and projected to real model shapes.

Each kind is written as the pipeline writes it (stagebudget.prefixcache):
- ``weights``: a stage end holding the merged model (``save_pretrained``, safetensors): what
  every LoRA stage end held before adapters, and what a full fine-tuning end still holds;
- ``adapter``: a LoRA stage end holding its adapter (``PeftModel.save_pretrained``), rebuilt
  by merging onto the model it started from (the seconds to load include the merge);
- ``adapter+optimizer``: a LoRA stage's Trainer checkpoint: adapter plus AdamW state after a
  real step (``optimizer.pt``, ``torch.save`` as the Trainer writes it);
- ``weights+optimizer``: a full fine-tuning stage's Trainer checkpoint.

A search writes, per LoRA stage it trains, one stage end and ``k`` checkpoints (``k`` is the
measured checkpoints per stage end of a real search's cache: ``--cache``). The projection
multiplies bytes per parameter (measured here) by the parameter and adapter counts of each
shape: bytes per search = trials x stages x (end + k x checkpoint).

    .venv/bin/python bench/cache_bytes.py [--cache ~/.cache/stagebudget/prefixes]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

RANK = 16
SHAPES = {  # hidden, layers, intermediate, vocab (untied head), as their config.json say
    "bench ~130M": (768, 12, 2048, 32000),
    "0.5B (Qwen2.5-0.5B)": (896, 24, 4864, 151936),
    "1.5B (Qwen2.5-1.5B)": (1536, 28, 8960, 151936),
    "7B (Qwen2.5-7B)": (3584, 28, 18944, 152064),
    "8B (Llama-3-8B)": (4096, 32, 14336, 128256),
}


def counts(hidden: int, layers: int, inter: int, vocab: int) -> tuple[int, int]:
    """Parameters of the model (no GQA: an upper bound) and of a rank-16 all-linear adapter."""
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    adapter = RANK * layers * (4 * 2 * hidden + 3 * (hidden + inter))
    return per_layer * layers + 2 * vocab * hidden, adapter


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_step(model, optimizer) -> None:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def measure(scratch: Path) -> dict[str, dict[str, float]]:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden, layers, inter, vocab = SHAPES["bench ~130M"]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         vocab_size=vocab, num_attention_heads=12, num_key_value_heads=12,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    out: dict[str, dict[str, float]] = {}

    def timed(kind: str, params: int, save, load) -> None:
        folder = scratch / kind
        start = time.perf_counter()
        save(folder)
        saved = time.perf_counter() - start
        start = time.perf_counter()
        load(folder)
        out[kind] = {"bytes": folder_bytes(folder), "params": params, "save_s": saved,
                     "load_s": time.perf_counter() - start}

    timed("weights", n_params, lambda d: model.save_pretrained(d, safe_serialization=True),
          lambda d: AutoModelForCausalLM.from_pretrained(d, use_safetensors=True))
    full_opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    one_step(model, full_opt)

    def save_full(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        torch.save(full_opt.state_dict(), d / "optimizer.pt")

    timed("weights+optimizer", n_params, save_full,
          lambda d: (AutoModelForCausalLM.from_pretrained(d, use_safetensors=True),
                     torch.load(d / "optimizer.pt")))
    base = LlamaForCausalLM(config)
    peft_model = get_peft_model(LlamaForCausalLM(config),
                                LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    adapter_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    one_step(peft_model, lora_opt)
    timed("adapter", adapter_params, lambda d: peft_model.save_pretrained(d),
          lambda d: PeftModel.from_pretrained(base, str(d)).merge_and_unload())

    def save_lora(d: Path) -> None:
        peft_model.save_pretrained(d)
        torch.save(lora_opt.state_dict(), d / "optimizer.pt")

    timed("adapter+optimizer", adapter_params, save_lora,
          lambda d: torch.load(d / "optimizer.pt"))
    return out


def checkpoints_per_end(cache: Path) -> float | None:
    """Step checkpoints per stage end in a real search's cache (its entry folder names)."""
    kinds = Counter(p.name.partition("-")[0] for p in (cache / "entries").glob("*/*/*-*"))
    return kinds["step"] / kinds["end"] if kinds["end"] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/stagebudget/prefixes")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--stages", type=int, default=2, help="LoRA stages per trial")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="stagebudget-cache-bench-"))
    try:
        kinds = measure(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("| entry kind | parameters | MB | bytes/param | save s | load s |\n|---|---|---|---|---|---|")
    for kind, m in kinds.items():
        print(f"| {kind} | {m['params'] / 1e6:.1f}M | {m['bytes'] / 1e6:.1f} | "
              f"{m['bytes'] / m['params']:.2f} | {m['save_s']:.2f} | {m['load_s']:.2f} |")
    k = checkpoints_per_end(args.cache.expanduser())
    print(f"\nstep checkpoints per stage end in {args.cache}: "
          f"{'none found' if k is None else f'{k:.2f}'}")
    per = {kind: m["bytes"] / m["params"] for kind, m in kinds.items()}
    print(f"\n{args.trials}-trial search, {args.stages} LoRA (rank {RANK}) stages per trial, GB "
          "written (before: merged ends; now: adapter ends; k = checkpoints per stage end)\n")
    ks = [0.0, 1.0] + ([k] if k is not None else [])
    head = " | ".join(f"now k={x:.1f} | now/before" for x in ks)
    print(f"| shape | params | before k={ks[-1]:.1f} | {head} |\n|---|---|---|" + "---|---|" * len(ks))
    for name, shape in SHAPES.items():
        params, adapter = counts(*shape)
        ckpt = adapter * per["adapter+optimizer"]
        before = args.trials * args.stages * (params * per["weights"] + ks[-1] * ckpt)
        cells = []
        for x in ks:
            now = args.trials * args.stages * (adapter * per["adapter"] + x * ckpt)
            before_x = args.trials * args.stages * (params * per["weights"] + x * ckpt)
            cells.append(f"{now / 1e9:.2f} | {now / before_x:.1%}")
        print(f"| {name} | {params / 1e9:.2f}B | {before / 1e9:.1f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()

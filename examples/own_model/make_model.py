"""Build a small local chat model directory, the kind stagebudget takes as ``base_model``.

It stands in for your own Hugging Face model (an instruct or reasoning model): a byte-level BPE
tokenizer trained here on the task file, a ChatML-style chat template, a tiny Llama with random
weights, safetensors, and a generation config that declares two stop tokens (``</s>`` and
``<|im_end|>``), as chat models do. Nothing is downloaded.

    python examples/own_model/make_model.py            # writes examples/own_model/model/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
# ChatML, as in Qwen-style instruct models; it writes BOS itself, so the tokenizer's own
# BOS must not be added again (stagebudget and TRL tokenise templates without it).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus(task_file: Path) -> list[str]:
    """The texts the tokenizer learns its merges from: every prompt and completion."""
    texts = []
    for line in task_file.read_text().splitlines():
        row = json.loads(line)
        texts += [m["content"] for m in row["prompt"]]
        texts.append(row.get("completion", row["answer"]))
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer (every byte covered) that adds BOS like Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
        padding_side="left")


def build_model(out: Path, task_file: Path, seed: int = 0) -> Path:
    """Write tokenizer, config, generation config and safetensors weights to ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus(task_file))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    stops = [ids["</s>"], ids["<|im_end|>"]]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=ids["<s>"], eos_token_id=stops,
        pad_token_id=ids["<pad>"])
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=stops,
                                               pad_token_id=ids["<pad>"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "model"
    build_model(target, HERE / "tasks.jsonl")
    print(f"model written to {target}")

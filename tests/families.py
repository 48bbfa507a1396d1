"""Tiny random-initialised models of the architecture families users fine-tune, built locally
from each family's own config class (no download): the shapes that differ between families
(MoE routing, sliding-window and hybrid attention caches, Conv1D layers, no BOS...) at a few
thousand parameters. :func:`build_family_model` writes one as a user's model directory: a
byte-level BPE tokenizer trained on the task texts, with the family's special tokens, BOS
habit, chat template and stop tokens. Shared by the family tests."""

from __future__ import annotations

from typing import Any

VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
_TOKENS = {"vocab_size": VOCAB, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
_COMMON = {**_TOKENS, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "tie_word_embeddings": False}

# family -> (config class, model class, config overrides). A short sliding window (4) so that
# prompts are longer than it: the cache must then hold a window, not the whole prefix.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 8, "moe_intermediate_size": 16, "num_experts": 4,
                   "num_experts_per_tok": 2, "output_router_logits": True}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 8, "sliding_window": 4, "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}),
}


def tiny_model(family: str, seed: int = 0) -> Any:
    """A tiny model of ``family`` in eval mode, weights from ``seed``."""
    import torch
    import transformers

    config_name, model_name, overrides = FAMILIES[family]
    config_cls = getattr(transformers, config_name)
    common = dict(_TOKENS) if family == "gpt2" else dict(_COMMON)
    config = config_cls(**{**common, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


# family -> (special tokens: bos, eos, pad, extra; chat template or None for plain-text prompts;
# the chat's end-of-turn stop token or None; whether the tokenizer adds BOS itself). The
# templates have each family's shape (role markers, turn ends, where BOS goes), not every detail.
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
          "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
          "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_ROLE_TAGS = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TOKENS: dict[str, tuple[tuple[str, str, str, tuple[str, ...]], str | None, str | None, bool]] = {
    "llama": (("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
              "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
              "{% endif %}", "<|eot_id|>", True),
    "qwen2": (("", "<|im_end|>", "<|endoftext|>", ("<|im_start|>",)), _CHATML, None, False),
    "qwen3": (("", "<|im_end|>", "<|endoftext|>", ("<|im_start|>",)), _CHATML, None, False),
    "qwen3_moe": (("", "<|im_end|>", "<|endoftext|>", ("<|im_start|>",)), _CHATML, None, False),
    "gemma2": (("<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>")), _GEMMA,
               "<end_of_turn>", True),
    "gemma3": (("<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>")), _GEMMA,
               "<end_of_turn>", True),
    "phi3": (("<s>", "<|endoftext|>", "<|dummy_pad|>",
              ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")), _ROLE_TAGS, "<|end|>", False),
    "mistral": (("<s>", "</s>", "<pad>", ("[INST]", "[/INST]")),
                "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
                "{{ m['content'] }}</s>{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}"
                "{% endfor %}", None, False),
    "olmo2": (("<|endoftext|>", "<|endoftext|>", "<|pad|>",
               ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")), _ROLE_TAGS, "<|end|>",
              False),
    "smollm3": (("", "<|im_end|>", "<|finetune_right_pad|>", ("<|im_start|>",)), _CHATML, None,
                False),
    "granite": (("", "<|end_of_text|>", "<|pad|>", ("<|start_of_role|>", "<|end_of_role|>")),
                "{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>"
                "{{ m['content'] }}<|end_of_text|>\n{% endfor %}{% if add_generation_prompt %}"
                "<|start_of_role|>assistant<|end_of_role|>{% endif %}", None, False),
    "gpt2": (("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", ()), None, None, False),
}


def build_family_tokenizer(family: str, texts: list[str], vocab_size: int = 300) -> Any:
    """A byte-level BPE tokenizer with ``family``'s special tokens, BOS habit and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    (bos, eos, pad, extra), template, _, adds_bos = TOKENS[family]
    specials = list(dict.fromkeys(t for t in (bos, eos, pad, *extra) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos or None, eos_token=eos, pad_token=pad,
        additional_special_tokens=[t for t in extra if t not in (bos, eos, pad)],
        chat_template=template, padding_side="left")


def build_family_model(family: str, out: Any, texts: list[str], seed: int = 0) -> Any:
    """Write a tiny ``family`` model directory (tokenizer, config with the family's stop
    tokens, generation config, safetensors) to ``out``; return the path."""
    import torch
    import transformers
    from transformers import GenerationConfig

    tokenizer = build_family_tokenizer(family, texts)
    (bos, eos, pad, _), _, end_of_turn, _ = TOKENS[family]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (bos, eos, pad, end_of_turn) if t}
    stops = list(dict.fromkeys([ids[eos], *([ids[end_of_turn]] if end_of_turn else [])]))
    tokens = {"vocab_size": len(tokenizer), "bos_token_id": ids.get(bos) if bos else None,
              "eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": ids[pad]}
    config_name, model_name, overrides = FAMILIES[family]
    sizes = {"n_positions": 512} if family == "gpt2" else {**_COMMON, "max_position_embeddings": 512}
    config = getattr(transformers, config_name)(**{**sizes, **overrides, **tokens})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.generation_config = GenerationConfig(**{k: v for k, v in tokens.items()
                                                  if k != "vocab_size"})
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out

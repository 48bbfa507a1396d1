"""Tiny random-initialised models of the architecture families users fine-tune, built locally
from each family's own config class (no download): the shapes that differ between families
(MoE routing, sliding-window and hybrid attention caches, Conv1D layers, no BOS...) at a few
thousand parameters. Shared by the family tests."""

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

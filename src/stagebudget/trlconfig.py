"""StageSpec -> TRL config arguments and ``peft.LoraConfig`` kwargs: the one mapping.

Training builds its configs from it (:func:`stagebudget.training.stages.common.training_args`,
:func:`~stagebudget.training.stages.common.lora_config`); export writes the same arguments for users to
take to their own pipeline, so an exported config is what trained. Nothing heavy is imported.

>>> lora_kwargs(StageSpec(kind="sft", steps=10, lora_rank=0)) is None
True
"""

from __future__ import annotations

import copy
from typing import Any

from stagebudget.kinds import get_kind
from stagebudget.schedule import CPT_CORPORA, StageSpec, VLLMSpec

MIN_CORPUS = 256  # the fewest texts a cpt stage trains on

# The algorithm, pinned. Every TRL/transformers setting that changes what a stage trains and that
# the stage spec does not set is written here with the value stagebudget trains with (TRL 1.16's
# default, so pinning changed nothing there), and goes into every stage's config and export: an
# exported config trains the same algorithm under a TRL whose defaults moved (and fails loudly
# under one that lacks a setting). ``test_trlconfig.py`` walks every field of the config classes
# under the installed TRL: each is set from the spec, pinned here, or listed in NOT_ALGORITHM.
_OPTIMISATION: dict[str, Any] = {
    "optim": "adamw_torch_fused", "optim_args": None, "optim_target_modules": None,
    "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08,
    "max_grad_norm": 1.0, "lr_scheduler_kwargs": None, "label_smoothing_factor": 0.0,
    "neftune_noise_alpha": None, "average_tokens_across_devices": True,
    "use_liger_kernel": False, "dataloader_drop_last": False, "train_sampling_strategy": "random",
    "router_aux_loss_coef": None,  # MoE models: the load-balancing loss weight (None: the model's)
}
ALGORITHM: dict[str, dict[str, Any]] = {
    "trl.SFTConfig": {
        **_OPTIMISATION, "loss_type": "nll", "assistant_only_loss": False,
        "truncation_mode": "keep_start", "padding_free": False, "eos_token": None,
        "pad_token": None, "chat_template_path": None, "dataset_kwargs": None,
        "dataset_text_field": "text", "shuffle_dataset": False,
    },
    "trl.GRPOConfig": {
        **_OPTIMISATION, "loss_type": "dapo", "scale_rewards": "group",
        "multi_objective_aggregation": "sum_then_normalize", "reward_weights": None,
        "epsilon": 0.2, "epsilon_high": 0.2, "delta": None, "importance_sampling_level": "token",
        "num_iterations": 1, "steps_per_generation": 1, "mask_truncated_completions": False,
        "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,
        "generation_kwargs": None, "chat_template_kwargs": None,
        "top_entropy_quantile": 1.0, "entropy_coef": 0.0, "use_adaptive_entropy": False,
        "off_policy_mask_threshold": None, "use_bias_correction_kl": True,
        "sync_ref_model": False, "disable_dropout": False, "cast_lm_head_to_fp32": False,
    },
}

# A stage's ``vllm`` setting as TRL's GRPOConfig takes it, with the vLLM-only settings that
# change what is trained pinned at TRL 1.16's defaults: vLLM's own model implementation, and
# TRL's importance-sampling correction of the gap between vLLM's and the trainer's
# log-probabilities (per sequence, masked above 3).
VLLM_ALGORITHM: dict[str, Any] = {
    "vllm_model_impl": "vllm", "vllm_max_model_length": None,
    "vllm_structured_outputs_regex": None, "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask", "vllm_importance_sampling_clip_max": 3.0,
    "vllm_importance_sampling_clip_min": None, "vllm_importance_sampling_cap": None,
}


def vllm_kwargs(vllm: VLLMSpec) -> dict[str, Any]:
    """GRPOConfig arguments of a ``vllm`` stage setting (see :class:`VLLMSpec`).

    >>> vllm_kwargs(VLLMSpec())["vllm_mode"], vllm_kwargs(VLLMSpec())["use_vllm"]
    ('colocate', True)
    """
    return {
        "use_vllm": True,
        "vllm_mode": vllm.mode,
        "vllm_gpu_memory_utilization": vllm.gpu_memory_utilization,
        "vllm_tensor_parallel_size": vllm.tensor_parallel_size,
        "vllm_enable_sleep_mode": vllm.enable_sleep_mode,
        **VLLM_ALGORITHM,
    }


# The fields that do not change what is trained, given the settings above: where files and logs
# go, how progress is shown, evaluation through the Trainer (stagebudget evaluates itself),
# hubs and trackers, distributed plumbing, how data reaches the model, and settings only read
# when a feature stagebudget leaves off is on (paged or continuous batching, packing, other loss
# types, a synced reference model, adaptive entropy) or that a stage's ``vllm`` setting writes
# (:func:`vllm_kwargs`; off, TRL reads none of them).
NOT_ALGORITHM = frozenset({
    "output_dir", "overwrite_output_dir", "run_name", "project", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "report_to", "logging_dir", "logging_strategy",
    "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "disable_tqdm", "include_num_input_tokens_seen", "skip_memory_metrics",
    "debug", "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
    "enable_jit_checkpoint", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "resume_from_checkpoint", "ignore_data_skip", "restore_callback_states_from_checkpoint",
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
    "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
    "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "eval_packing",
    "num_generations_eval", "do_train", "do_eval", "do_predict", "num_train_epochs", "push_to_hub",
    "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    "bf16", "fp16", "tf32", "use_cpu", "local_rank", "accelerator_config", "parallelism_config",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
    "ddp_backend", "ddp_timeout", "fsdp", "fsdp_config", "deepspeed", "ds3_gather_for_generation",
    "full_determinism", "torch_empty_cache_steps", "auto_find_batch_size", "torch_compile",
    "torch_compile_backend", "torch_compile_mode", "liger_kernel_config", "activation_checkpointing",
    "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs", "activation_offloading",
    "use_cache", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order",
    "remove_unused_columns", "label_names", "length_column_name", "dataset_num_proc",
    "pad_to_multiple_of", "model_init_kwargs", "trust_remote_code", "packing_strategy",
    "generation_batch_size", "cache_implementation", "use_vllm", "vllm_mode", "vllm_model_impl",
    "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url",
    "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port",
    "vllm_gpu_memory_utilization", "vllm_max_model_length", "vllm_tensor_parallel_size",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_cap", "use_transformers_continuous_batching",
    "transformers_continuous_batching_config", "use_transformers_paged", "max_tool_calling_iterations",
    "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg", "ref_model_mixup_alpha", "ref_model_sync_steps", "entropy_coef_min",
    "entropy_coef_max", "entropy_coef_delta", "entropy_target", "log_completions", "log_multimodal",
    "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo"
})


def corpus_size(spec: StageSpec) -> int:
    """Texts in one pass of a stage of a ``text_corpus`` kind (cpt), as stagebudget trains it.

    >>> corpus_size(StageSpec(kind="cpt", steps=100, batch_size=8))
    800
    """
    return max(MIN_CORPUS, spec.steps * spec.batch_size)


def corpus_name(spec: StageSpec) -> str:
    """The corpus a ``text_corpus`` stage (cpt) trains on: its ``corpus``, else the first of
    :data:`~stagebudget.schedule.CPT_CORPORA` (the base's pre-training mixture).

    >>> corpus_name(StageSpec(kind="cpt", steps=10))
    'mixture'
    >>> corpus_name(StageSpec(kind="cpt", steps=10, corpus="raw"))
    'raw'
    """
    return spec.corpus or CPT_CORPORA[0]


def config_class(spec: StageSpec) -> str:
    """The TRL config class a stage trains with, e.g. ``"trl.GRPOConfig"``."""
    return get_kind(spec.kind).trl_config


def trl_config_kwargs(spec: StageSpec, seed: int | None = None, workers: int = 1) -> dict[str, Any]:
    """TRL config arguments equivalent to one stage. The learning rate is constant (no warmup),
    as stagebudget trains.

    For a generating kind (rl), ``batch_size`` counts prompts, while TRL's
    ``per_device_train_batch_size`` counts completions, so it is ``batch_size *
    num_generations`` (one device, no accumulation); the kind's own fields (``num_generations``,
    ``beta``...) are TRL arguments of the same name. There is no ``eval_strategy``: stagebudget
    measures ID/OOD itself by greedy generation every ``eval_interval`` steps (a callback), not
    with the Trainer's eval loop, which would need an eval dataset. Precision depends on the
    machine: see :func:`precision_kwargs`. With ``workers`` data-parallel processes the global
    batch stays ``batch_size``: each trains ``batch_size / workers`` (the space checked that it
    divides evenly).

    >>> trl_config_kwargs(StageSpec(kind="sft", steps=40, batch_size=8))["max_steps"]
    40
    """
    kind = get_kind(spec.kind)
    args: dict[str, Any] = {
        "max_steps": spec.steps,
        "learning_rate": spec.learning_rate,
        "per_device_train_batch_size": spec.batch_size,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        # TRL 1.x turns it on by default; slower at these sizes, and not how the search trained.
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
    }
    if seed is not None:
        args.update(seed=seed, data_seed=seed)
    if kind.uses_max_length:
        args["max_length"] = spec.max_length
        args["packing"] = False
    args.update({name: getattr(spec, name) for name in kind.defaults if name not in kind.data_fields})
    if kind.generates:
        args["per_device_train_batch_size"] = spec.batch_size * int(spec.num_generations or 1)
    args.update(ALGORITHM.get(kind.trl_config, {}))
    args.update(kind.trl_args)
    if spec.vllm is not None:
        args.update(vllm_kwargs(spec.vllm))
    if workers > 1:
        if args["per_device_train_batch_size"] % workers:
            raise ValueError(f"batch_size {spec.batch_size} of the {spec.kind} stage does not split "
                             f"evenly across {workers} workers")
        args["per_device_train_batch_size"] //= workers
    return args


def precision_kwargs(device: str, bf16: bool = True) -> dict[str, Any]:
    """Precision settings for a machine kind: fp32 on a CPU (TRL's configs default to bf16 and
    raise there); bf16 on CUDA when the GPU supports it (``bf16``).

    >>> precision_kwargs("cpu")
    {'bf16': False, 'fp16': False, 'use_cpu': True}
    """
    if device.startswith("cuda"):
        return {"bf16": bf16, "use_cpu": False}
    return {"bf16": False, "fp16": False, "use_cpu": True}


# The adapter, pinned as the algorithm is: every ``peft.LoraConfig`` setting that changes what a
# LoRA stage trains and that the stage spec does not set, at the value stagebudget trains with
# (PEFT 0.21's default: pinning changed nothing there). Plain LoRA on the spec's target modules:
# no DoRA, rsLoRA, per-layer ranks, extra trained modules or other initialisations.
LORA_ALGORITHM: dict[str, Any] = {
    "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
    "use_dora": False, "use_qalora": False, "lora_bias": False, "init_lora_weights": True,
    "modules_to_save": None, "exclude_modules": None, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    "trainable_token_indices": None, "layer_replication": None, "target_parameters": None,
    "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None,
    "ensure_weight_tying": False,
}

# LoraConfig fields that do not change what is trained, given the settings above: bookkeeping
# PEFT fills in, inference and runtime switches, and settings only read when a variant or an
# initialisation the pins leave off is on.
NOT_LORA_ALGORITHM = frozenset({
    "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "velora_config", "qalora_group_size",
    "monteclora_config", "kasa_config", "direction", "scale", "stable_gamma", "num_samples",
    "use_entropy", "dirichlet_prior", "sample_scaler", "kl_loss_weight", "buffer_size",
})


def lora_kwargs(spec: StageSpec) -> dict[str, Any] | None:
    """``peft.LoraConfig`` kwargs for one stage, the pinned adapter settings included; None for
    rank 0 (full fine-tuning).

    >>> lora_kwargs(StageSpec(kind="rl", steps=5, lora_rank=4))["lora_alpha"]
    8
    """
    if spec.lora_rank == 0:
        return None
    return {
        "r": spec.lora_rank,
        "lora_alpha": spec.alpha,
        "target_modules": spec.target_modules,
        "lora_dropout": spec.dropout,
        "task_type": "CAUSAL_LM",
        **copy.deepcopy(LORA_ALGORITHM),  # fresh dicts: PEFT may fill them in
    }

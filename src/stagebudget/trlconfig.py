"""StageSpec -> TRL config arguments and ``peft.LoraConfig`` kwargs: the one mapping.

Training builds its configs from it (:func:`stagebudget.training.stages.common.training_args`,
:func:`~stagebudget.training.stages.common.lora_config`); export writes the same arguments for users to
take to their own pipeline, so an exported config is what trained. Nothing heavy is imported.

>>> lora_kwargs(StageSpec(kind="sft", steps=10, lora_rank=0)) is None
True
"""

from __future__ import annotations

from typing import Any

from stagebudget.kinds import get_kind
from stagebudget.schedule import StageSpec

MIN_CORPUS = 256  # the fewest texts a cpt stage trains on


def corpus_size(spec: StageSpec) -> int:
    """Texts in one pass of a stage of a ``text_corpus`` kind (cpt), as stagebudget trains it.

    >>> corpus_size(StageSpec(kind="cpt", steps=100, batch_size=8))
    800
    """
    return max(MIN_CORPUS, spec.steps * spec.batch_size)


def config_class(spec: StageSpec) -> str:
    """The TRL config class a stage trains with, e.g. ``"trl.GRPOConfig"``."""
    return get_kind(spec.kind).trl_config


def trl_config_kwargs(spec: StageSpec, seed: int | None = None) -> dict[str, Any]:
    """TRL config arguments equivalent to one stage. The learning rate is constant (no warmup),
    as stagebudget trains.

    For a generating kind (rl), ``batch_size`` counts prompts, while TRL's
    ``per_device_train_batch_size`` counts completions, so it is ``batch_size *
    num_generations`` (one device, no accumulation); the kind's own fields (``num_generations``,
    ``beta``...) are TRL arguments of the same name. There is no ``eval_strategy``: stagebudget
    measures ID/OOD itself by greedy generation every ``eval_interval`` steps (a callback), not
    with the Trainer's eval loop, which would need an eval dataset. Precision depends on the
    machine: see :func:`precision_kwargs`.

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
    args.update({name: getattr(spec, name) for name in kind.defaults})
    if kind.generates:
        args["per_device_train_batch_size"] = spec.batch_size * int(spec.num_generations or 1)
    args.update(kind.trl_args)
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


def lora_kwargs(spec: StageSpec) -> dict[str, Any] | None:
    """``peft.LoraConfig`` kwargs for one stage; None for rank 0 (full fine-tuning).

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
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }

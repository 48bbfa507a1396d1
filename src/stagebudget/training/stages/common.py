"""What every stage shares: context, output, LoRA config, device settings, callbacks, merging.

A stage is a function ``StageContext -> StageOutput``. It builds a TRL trainer from the context
with :func:`training_args` and :func:`stage_callbacks`, trains it with :func:`train_and_merge`
and returns the merged plain model. LoRA settings become a ``peft.LoraConfig`` here and only here
(:func:`lora_config`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stagebudget.errors import TrainingDiverged
from stagebudget.schedule import StageSpec
from stagebudget.training import distributed
from stagebudget.training.clock import BudgetClock, budget_callback
from stagebudget.trlconfig import lora_kwargs, precision_kwargs, trl_config_kwargs

# Nothing here ever talks to the Hugging Face Hub: models and tokenizers are local objects.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass
class StageContext:
    """Everything a stage needs. ``evaluate(model, step)`` is the pipeline's evaluation hook.

    ``logs`` receives every training log row (TRL's ``loss``/``reward``...) with its ``step``.
    ``resume_from`` is a Trainer checkpoint to go on from (a cached prefix of this stage);
    ``on_checkpoint(step, folder)``, when set, receives a Trainer checkpoint at the end, at the
    steps in ``checkpoint_at`` and at the first evaluation point after ``recovery_seconds`` of
    training since the last checkpoint (0: every evaluation point); the folder is deleted
    after the call. ``evaluate_on_resume``: the
    checkpoint's step is an evaluation point not measured yet; measure it before going on.
    """

    model: Any
    tokenizer: Any
    suite: Any
    spec: StageSpec
    stage_index: int
    clock: BudgetClock
    evaluate: Callable[[Any, int], dict[str, Any]]
    seed: int = 0
    device: str = "cpu"
    logs: list[dict[str, Any]] = field(default_factory=list)
    extra_callbacks: list[Any] = field(default_factory=list)
    resume_from: str | None = None
    on_checkpoint: Callable[[int, str], None] | None = None
    checkpoint_at: frozenset[int] = frozenset()
    recovery_seconds: float = 0.0
    evaluate_on_resume: bool = False
    keep_adapter: bool = False


@dataclass
class StageOutput:
    """A trained stage: the merged plain model, its metrics and the steps it took; with
    ``keep_adapter``, ``adapter`` is a folder holding the LoRA adapter as PEFT saved it before
    merging (None for full fine-tuning). Whoever receives it deletes the folder."""

    model: Any
    metrics: dict[str, Any]
    steps_done: int
    adapter: str | None = None


StageFn = Callable[[StageContext], StageOutput]


def resolve_device(device: str = "auto", gpus: float | None = None) -> str:
    """The one device rule. An explicit device passes through; ``"auto"`` is ``"cuda"`` when
    the trial has GPUs (``gpus``, its Ray resources, when known) or else when torch sees one,
    otherwise ``"cpu"``. Valid names are checked where they are given (``space.DEVICE``).

    >>> resolve_device("auto", gpus=0)
    'cpu'
    """
    if device != "auto":
        return device
    if gpus is not None:
        return "cuda" if gpus > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def lora_config(spec: StageSpec) -> Any:
    """The ``peft.LoraConfig`` of a stage, or None for full fine-tuning (rank 0).

    >>> lora_config(StageSpec(kind="sft", steps=1, lora_rank=0)) is None
    True
    """

    kwargs = lora_kwargs(spec)
    if kwargs is None:
        return None
    from peft import LoraConfig

    return LoraConfig(**kwargs)


def merge(model: Any) -> Any:
    """Fold a LoRA adapter into the weights (``merge_and_unload``); plain models pass through."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def precision_args(device: str) -> dict[str, Any]:
    """CPU: fp32 (``bf16=False``, ``use_cpu=True``); CUDA: bf16 when the GPU supports it."""

    if device.startswith("cuda"):
        import torch

        return precision_kwargs(device, bf16=bool(torch.cuda.is_bf16_supported()))
    return precision_kwargs(device)


def training_args(ctx: StageContext, **extra: Any) -> dict[str, Any]:
    """Keyword arguments shared by every stage's ``SFTConfig``/``GRPOConfig``.

    The export's mapping (constant learning rate without warm-up, so a shorter run is a true
    prefix of a longer one; no checkpoints, no reporting, a log row at every step; gradient
    checkpointing off) plus a scratch output directory, no progress bars and the precision of
    this machine.
    """
    spec = ctx.spec
    args: dict[str, Any] = {
        # several data-parallel workers split the stage's batch (same global batch)
        **trl_config_kwargs(spec, ctx.seed, workers=distributed.world_size()),
        # one folder for all workers: a checkpoint holds every worker's RNG state
        "output_dir": distributed.from_rank0(
            tempfile.mkdtemp(prefix=f"stagebudget-{spec.kind}-") if distributed.rank() == 0
            else None),
        "logging_nan_inf_filter": False,  # a NaN loss must reach the divergence check
        "disable_tqdm": True,
        **precision_args(ctx.device),
    }
    if ctx.on_checkpoint is not None:  # a checkpoint at the end; the callback adds the others
        args.update(save_strategy="steps", save_steps=spec.steps, save_only_model=False)
    args.update(extra)
    return installed_names(args)


def installed_names(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` under the names the installed transformers takes. TRL's configs set
    ``gradient_checkpointing`` (default True); transformers 5.2x renamed it
    ``activation_checkpointing``, warns on the old name in every stage of every trial and drops
    it in v6. The new name, where it exists, decides: both end up with its value.
    """
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "gradient_checkpointing" in args and "activation_checkpointing" in names:
        args = dict(args)
        args["activation_checkpointing"] = args.pop("gradient_checkpointing")
    return args


def no_progress_bars() -> None:
    """Turn off the progress bars of datasets and transformers (a trial reports its own
    progress); their warnings stay, e.g. a user's model loading with weights missing."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()


def quiet_libraries() -> None:
    """Silence progress bars and info logs of datasets/transformers (a trial logs its own)."""
    import warnings

    import transformers

    # TRL 1.16's configs still read a renamed transformers attribute; harmless, but it would
    # print on every stage of every trial.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    no_progress_bars()
    transformers.logging.set_verbosity_error()


def stage_callbacks(ctx: StageContext) -> list[Any]:
    """Callbacks every stage trains with: logging + divergence + evaluation, and the budget."""
    callbacks = [_log_eval_callback(ctx), budget_callback(ctx.clock), *ctx.extra_callbacks]
    if ctx.on_checkpoint is not None:
        callbacks.append(_checkpoint_callback(ctx))
    return callbacks


def _checkpoint_callback(ctx: StageContext) -> Any:
    from transformers import TrainerCallback

    assert ctx.on_checkpoint is not None
    publish: Callable[[int, str], None] = ctx.on_checkpoint
    at, every = ctx.checkpoint_at, ctx.spec.eval_interval

    class CheckpointCallback(TrainerCallback):  # type: ignore[misc]
        """Save also at the steps in ``at`` and, for recovery, at an evaluation point once
        ``ctx.recovery_seconds`` of training passed since the last save; hand each checkpoint
        the Trainer saved to ``publish``, then delete the folder."""

        last_saved = ctx.clock.train_seconds()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            due = ctx.clock.train_seconds() - self.last_saved >= ctx.recovery_seconds
            # workers save together or not at all: rank 0's clock decides
            if step in at or (step % every == 0 and distributed.from_rank0(due)):
                control.should_save = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_saved = ctx.clock.train_seconds()
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            # Several workers: each wrote its part (its RNG state) of rank 0's folder; every
            # rank takes part in publishing (its spend is recorded), rank 0 writes the entry.
            distributed.barrier()
            if distributed.from_rank0(os.path.isdir(folder)):
                try:
                    publish(int(state.global_step), folder)
                finally:
                    if distributed.rank() == 0:
                        shutil.rmtree(folder, ignore_errors=True)

    return CheckpointCallback()


def _log_eval_callback(ctx: StageContext) -> Any:
    from transformers import TrainerCallback

    class LogEvalCallback(TrainerCallback):  # type: ignore[misc]
        """Record each log row, raise on a non-finite loss, evaluate every eval_interval steps."""

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           **kwargs: Any) -> None:
            if ctx.evaluate_on_resume and ctx.resume_from is not None:  # weights are loaded
                ctx.evaluate(model, int(state.global_step))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   model: Any = None, **kwargs: Any) -> None:
            if not logs or "train_runtime" in logs:  # the end-of-training summary row
                return
            step = int(state.global_step)
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingDiverged(ctx.spec.kind, ctx.stage_index, step, float(loss))
            ctx.logs.append({"step": step, **{k: _plain(v) for k, v in logs.items()}})
            # Step 0 and the last step are evaluated by the pipeline.
            if step % ctx.spec.eval_interval == 0 and step < ctx.spec.steps:
                ctx.evaluate(model, step)

    return LogEvalCallback()


def _plain(value: Any) -> Any:
    return float(value) if hasattr(value, "item") else value


def train_and_merge(ctx: StageContext, trainer: Any) -> tuple[Any, int, str | None]:
    """Run ``trainer.train()`` on the budget clock, then merge the adapter.

    Returns the merged plain model, the optimizer steps taken and, with ``ctx.keep_adapter``
    and a LoRA stage, a scratch folder with the adapter PEFT saved before the merge.
    """
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs go to ctx.logs, not to stdout
    try:
        if ctx.resume_from is not None and _checkpoint_step(ctx.resume_from) >= ctx.spec.steps:
            _load_finished(trainer, ctx.resume_from)
        else:
            with ctx.clock.training():
                trainer.train(resume_from_checkpoint=ctx.resume_from)
    finally:
        if distributed.rank() == 0:  # the workers' shared folder: rank 0 made it
            shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    with ctx.clock.setting_up():
        adapter = save_adapter(trainer.model) if ctx.keep_adapter else None
        model = merge(trainer.model)
    model.eval()
    return model, int(trainer.state.global_step), adapter


def save_adapter(model: Any) -> str | None:
    """Save a PEFT model's adapter (``PeftModel.save_pretrained``: safetensors and its config)
    to a new scratch folder; None for a plain model."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    folder = tempfile.mkdtemp(prefix="stagebudget-adapter-")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def apply_adapter(model: Any, folder: str | os.PathLike[str]) -> Any:
    """``model`` with the adapter saved in ``folder`` merged into its weights: the same
    computation as the merge at a stage's end, so the same weights bit for bit.

    What ``PeftModel.from_pretrained`` does for a local folder, but from the safetensors file
    only: PEFT would fall back to unpickling ``adapter_model.bin`` when that file is missing."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (the prefix cache keeps "
                                "adapters as safetensors only); remove the entry and train again")
    config = PeftConfig.from_peft_type(
        **PeftConfig.from_json_file(os.path.join(folder, "adapter_config.json")))
    config.inference_mode = True
    peft_model = PeftModel(model, config)
    set_peft_model_state_dict(peft_model, load_file(weights))
    return merge(peft_model)


def _checkpoint_step(folder: str) -> int:
    """The optimizer steps a Trainer checkpoint holds (its ``trainer_state.json``)."""
    import json

    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as fh:
        return int(json.load(fh)["global_step"])


def _load_finished(trainer: Any, folder: str) -> None:
    """Take a checkpoint that already holds all of the stage's steps: load its weights (the
    adapter, or the full model) and state without training. ``Trainer.train`` would take one
    more step before it compares the step count with ``max_steps``."""
    from transformers import TrainerState

    # The loading half of Trainer.train(resume_from_checkpoint=...): adapter or full weights.
    # Private (transformers 5.x): no public call loads a checkpoint into a Trainer without
    # training, and this one handles the adapter, safetensors and sharded cases as train()
    # does. A rename breaks reusing a cached checkpoint that holds all of a stage's steps
    # (tests/test_prefixcache.py).
    trainer._load_from_checkpoint(folder)
    trainer.state = TrainerState.load_from_json(os.path.join(folder, "trainer_state.json"))


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the log rows that have it (None when none do)."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def last_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The latest logged value of ``key`` (None when never logged)."""
    for row in reversed(rows):
        if row.get(key) is not None:
            return float(row[key])
    return None

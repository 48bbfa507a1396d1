"""The stand-alone training script an export writes beside its YAML: plain TRL + PEFT.

The script trains the exported schedule stage by stage (``SFTTrainer`` for cpt/sft,
``GRPOTrainer`` for rl, each stage with its own LoRA adapter merged into the weights before the
next stage attaches its own), then measures ID and OOD accuracy. What a stage sees is imported
from the code the trials run, never re-implemented: the task data (``load_suite``,
``pretrain_corpus``), the rows (``sft_row``, ``rl_rows``: prompt formatting, chat templates),
the RL reward (``suite_reward``), the base model's loading and the evaluation (``evaluate``:
greedy decoding, every stop token, the tasks' generation length and answer extraction). With
the same seed it measures what ``stagebudget train`` measures for the same schedule.

What is per kind comes from the kind registry (:mod:`stagebudget.kinds`): each kind's data code
(``script_data``) and, by its TRL config class, its trainer (:data:`SCRIPT_TRAINERS`). Rendering
is string work only (nothing heavy is imported here).

>>> "SFTTrainer" in render_script({"schedule": {"stages": []}, "trl": [], "source": {}})
True
"""

from __future__ import annotations

import pprint
import textwrap
from typing import Any

from stagebudget.kinds import get_kind, stage_kinds
from stagebudget.names import TORCH_THREADS
from stagebudget.schedule import TasksRef
from stagebudget.version import __version__

SCRIPT_HEAD = '''#!/usr/bin/env python3
"""Train {label} with plain TRL + PEFT, stage by stage, then measure ID/OOD accuracy.

Exported by stagebudget {version} from {origin}. Each stage trains its own LoRA adapter (or the
full model at rank 0), which is merged into the weights before the next stage begins. stagebudget
gives what a stage sees, the same code its trials use: the task data, the rows (prompt formatting
and chat templates), the RL reward, the base model's loading and the evaluation (greedy decoding,
stop tokens, generation length, answer extraction). `stagebudget train` on the exported YAML
trains the same schedule and, with the same seed and torch thread count, measures the same ID/OOD.

    python {{this file}} --out DIR [--save-model]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from stagebudget.basemodel import load_model_and_tokenizer, resolve_base_model  # as trials load it
from stagebudget.chat import sft_row  # an SFT row: text, or chat messages the template renders
from stagebudget.stages.rl import generating_model, rl_rows, suite_reward  # RL rows, model, reward
from stagebudget.tasks import load_suite, pretrain_corpus  # the task data
from stagebudget.training.evaluate import evaluate  # ID/OOD accuracy and standard errors
from stagebudget.training.stages.common import installed_names  # this transformers' arg names

'''

SCRIPT_BODY = '''

def load_base(ref: str, device: str):
    """The base model (safetensors) and its tokenizer (left padding, pad = EOS when it has
    none), as stagebudget's trials load them; ``builtin:NAME`` is shipped inside the package."""
    return load_model_and_tokenizer(resolve_base_model(ref), device=device,
                                    trust_remote_code=TRUST_REMOTE_CODE)


'''

# The script's stage_dataset (its per-kind branches, from the kind registry) goes here.

SCRIPT_TRAIN = '''

def train_stage(model, tokenizer, suite, stage: dict, out: Path):
    """One stage with TRL, its adapter merged into the returned plain model."""
    peft_config = LoraConfig(**stage["peft"]) if stage["peft"] else None
    args = installed_names({**stage["args"],
                            "output_dir": str(out / f"stage{stage['index']}-{stage['stage']}")})
    if args.get("bf16") and not torch.cuda.is_bf16_supported():
        args["bf16"] = False  # a GPU without bf16 trains in fp32, as stagebudget does
'''

# The trainer of the stage's kind goes here: how the script trains with each TRL config class
# a kind may name (``StageKindInfo.trl_config``); the last one the registered kinds use is the
# script's default branch.
SCRIPT_TRAINERS = {
    "trl.GRPOConfig": '''trainer = GRPOTrainer(model=generating_model(model),
                      reward_funcs=[suite_reward(suite)],
                      args=GRPOConfig(**args),
                      train_dataset=stage_dataset(stage, suite, tokenizer),
                      processing_class=tokenizer, peft_config=peft_config)''',
    "trl.SFTConfig": '''trainer = SFTTrainer(model=model, args=SFTConfig(**args),
                     train_dataset=stage_dataset(stage, suite, tokenizer),
                     processing_class=tokenizer, peft_config=peft_config)''',
}

SCRIPT_TAIL = '''    trainer.train()
    model = trainer.model
    if isinstance(model, PeftModel):  # TRL refuses a PeftModel with a new peft_config
        model = model.merge_and_unload()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("trained-trl"), help="output directory")
    parser.add_argument("--save-model", action="store_true", help="save the final merged model")
    parser.add_argument("--base-model", default=BASE_MODEL, help="builtin:NAME or a local directory")
    opts = parser.parse_args()
    if TORCH_THREADS:  # CPU float sums depend on the thread count: train as the trial did
        torch.set_num_threads(TORCH_THREADS)
    set_seed(SEED)
    model, tokenizer = load_base(opts.base_model, DEVICE)
    suite = load_suite(**TASKS)
    for stage in STAGES:
        model = train_stage(model, tokenizer, suite, stage, opts.out)
    # greedy decoding on the held-out ID and OOD sets, each accuracy with its standard error
    metrics = evaluate(model, tokenizer, suite)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if opts.save_model:
        model.save_pretrained(str(opts.out / "model"), safe_serialization=True)
        tokenizer.save_pretrained(str(opts.out / "model"))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
'''


def _scriptable() -> list[str]:
    """The registered kinds the script can train (their data code given, their TRL config class
    one of :data:`SCRIPT_TRAINERS`), in stage order."""
    return [k for k in stage_kinds()
            if get_kind(k).script_data is not None and get_kind(k).trl_config in SCRIPT_TRAINERS]


def _is_kind(kinds: list[str]) -> str:
    """The script's test that a stage is of one of ``kinds``."""
    if len(kinds) == 1:  # kind names are identifiers: no quoting needed
        return f'stage["stage"] == "{kinds[0]}"'
    return 'stage["stage"] in (' + ", ".join(f'"{k}"' for k in kinds) + ")"


def _stage_dataset(kinds: list[str]) -> str:
    """The script's ``stage_dataset``: each kind's ``script_data``, the last kind's unguarded."""
    # wrapped at 95 columns, as the script's docstring always was
    doc = textwrap.fill("; ".join(f"{k}: {get_kind(k).script_doc}" for k in kinds) + '."""',
                        width=95, initial_indent='    """', subsequent_indent="    ")
    lines = ["def stage_dataset(stage: dict, suite, tokenizer) -> Dataset:", doc]
    for i, kind in enumerate(kinds):
        code = str(get_kind(kind).script_data)
        if i < len(kinds) - 1:
            lines += [f"    if {_is_kind([kind])}:", textwrap.indent(code, " " * 8)]
        else:
            lines.append(textwrap.indent(code, " " * 4))
    return "\n".join(lines) + "\n"


def _trainer(kinds: list[str]) -> str:
    """The trainer lines of the script's ``train_stage``: one branch per TRL config class."""
    by_config: dict[str, list[str]] = {c: [k for k in kinds if get_kind(k).trl_config == c]
                                       for c in SCRIPT_TRAINERS}
    used = [c for c in SCRIPT_TRAINERS if by_config[c]]
    if len(used) == 1:
        return textwrap.indent(SCRIPT_TRAINERS[used[0]], " " * 4) + "\n"
    lines = []
    for i, config in enumerate(used):
        head = ("else:" if i == len(used) - 1 else
                f"{'if' if i == 0 else 'elif'} {_is_kind(by_config[config])}:")
        lines += ["    " + head, textwrap.indent(SCRIPT_TRAINERS[config], " " * 8)]
    return "\n".join(lines) + "\n"


def _check_scriptable(stages: list[dict[str, Any]], kinds: list[str]) -> None:
    for stage in stages:
        if stage["stage"] not in kinds:
            info = get_kind(stage["stage"])
            raise ValueError(
                f"the exported script cannot train a {info.name!r} stage: its kind registers "
                f"no script_data, or trains with {info.trl_config!r}, which the script has no "
                f"trainer for (it has: {', '.join(SCRIPT_TRAINERS)})")


def _literal(value: Any) -> str:
    return pprint.pformat(value, indent=1, width=96, sort_dicts=False)


def render_script(document: dict[str, Any], *, base_model: str | None = None,
                  device: str = "cpu") -> str:
    """The Python source of the stand-alone script for an export ``document`` (see
    :func:`stagebudget.results.export.export_document`). ``base_model`` overrides the schedule's (an
    absolute path for a local model)."""
    schedule = document["schedule"]
    source = document.get("source") or {}
    # load_suite's arguments as the trials load the suite (answer extraction, format reward and
    # generation length included): the schedule's own mapping, not a copy of it
    args = TasksRef.model_validate(schedule.get("tasks") or {}).suite_args()
    suite = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items() if v is not None}
    label = " -> ".join(f"{s['kind']} {s['steps']}@r{s.get('lora_rank', 8)}"
                        for s in schedule.get("stages", [])) or "a schedule"
    origin = (f"run {source.get('run')!r}, trial {source.get('trial')} "
              f"(pick {source.get('pick')!r})" if source else "a schedule")
    head = SCRIPT_HEAD.format(label=label, version=__version__, origin=origin)
    constants = "\n".join([
        f"BASE_MODEL = {base_model or schedule.get('base_model', 'builtin:tiny')!r}",
        f"DEVICE = {device!r}  # the machine kind the run trained on",
        f"SEED = {int(schedule.get('seed', 0))!r}",
        f"TRUST_REMOTE_CODE = {bool(schedule.get('trust_remote_code', False))!r}"
        "  # run the model's own code (only if the schedule said so)",
        f"TORCH_THREADS = {document.get(TORCH_THREADS)!r}"
        "  # torch threads the trial trained with (None: torch's default)",
        f"TASKS = {_literal(suite)}",
        f"STAGES = {_literal(document['trl'])}",
    ])
    kinds = _scriptable()
    _check_scriptable(document["trl"], kinds)
    return (head + constants + "\n" + SCRIPT_BODY + _stage_dataset(kinds) + SCRIPT_TRAIN
            + _trainer(kinds) + SCRIPT_TAIL)

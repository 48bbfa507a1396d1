"""The algorithm is pinned: every TRL setting that changes what a stage trains is set
explicitly (from the stage spec or ``trlconfig.ALGORITHM``), so an exported config trains the
same algorithm under a TRL whose defaults moved. These tests walk the config classes of the
installed TRL: a field TRL adds (or a default we rely on) left implicit fails here."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from stagebudget.kinds import get_kind, stage_kinds
from stagebudget.results.export import stage_export
from stagebudget.schedule import StageSpec
from stagebudget.trlconfig import ALGORITHM, NOT_ALGORITHM, config_class, trl_config_kwargs

ROOT = Path(__file__).resolve().parents[1]


def _class(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _fields(dotted: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_class(dotted))}


@pytest.mark.parametrize("kind", stage_kinds())
def test_every_field_that_changes_training_is_set_explicitly(kind: str) -> None:
    spec = StageSpec(kind=kind, steps=10, lora_rank=4)
    _assert_every_field_set(config_class(spec), trl_config_kwargs(spec, seed=0),
                            ALGORITHM[get_kind(kind).trl_config], NOT_ALGORITHM, "ALGORITHM")


def _assert_every_field_set(dotted: str, args: dict, pins: dict, inert: frozenset,
                            pins_name: str) -> None:
    """Every field of the config class ``dotted`` is in ``args`` or declared ``inert``; ``args``
    holds no field the class lacks; no pin is declared inert."""
    fields = _fields(dotted)
    implicit = sorted(set(fields) - set(args) - inert)
    assert not implicit, (
        f"{dotted} fields left to the library's defaults: {implicit}; pin each in "
        f"stagebudget.trlconfig.{pins_name} (today's value) or, if it cannot change what is "
        f"trained, add it to NOT_{pins_name}")
    unknown = sorted(set(args) - set(fields))
    assert not unknown, f"set but not a field of {dotted}: {unknown}"
    assert not set(pins) & inert


def test_the_pins_are_the_locked_trls_defaults() -> None:
    """Pinning changed nothing under the TRL the lock installs: each pin is that TRL's default
    (with the two that TRL derives: ``epsilon_high`` from ``epsilon``, ``steps_per_generation``
    from ``gradient_accumulation_steps``, here 1). Under another TRL this is what the pins guard
    against, so the comparison is made only under the locked version."""
    import trl

    locked = re.search(r"^trl==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert locked is not None
    if trl.__version__ != locked.group(1):
        pytest.skip(f"TRL {trl.__version__} is not the locked {locked.group(1)}: its defaults "
                    "may differ; the pins keep the algorithm")
    derived = {"epsilon_high": "epsilon", "steps_per_generation": None}
    for dotted, pins in ALGORITHM.items():
        fields = _fields(dotted)
        for name, value in pins.items():
            field = fields[name]
            default = (field.default if field.default is not dataclasses.MISSING
                       else field.default_factory())  # type: ignore[misc]
            if name in derived and default is None:
                default = pins[derived[name]] if derived[name] else 1
            assert default == value, (dotted, name, default, value)


@pytest.mark.parametrize("kind", stage_kinds())
def test_the_export_writes_the_pinned_algorithm(kind: str) -> None:
    spec = StageSpec(kind=kind, steps=10, lora_rank=4)
    entry = stage_export(spec, 0, seed=0, device="cpu")
    for name, value in ALGORITHM[entry["config"]].items():
        assert entry["args"][name] == value, name
    _class(entry["config"])(output_dir="/tmp/unused", **entry["args"])  # constructs as written


def test_every_lora_field_that_changes_training_is_set_explicitly() -> None:
    from stagebudget.trlconfig import LORA_ALGORITHM, NOT_LORA_ALGORITHM, lora_kwargs

    args = lora_kwargs(StageSpec(kind="sft", steps=10, lora_rank=4))
    assert args is not None
    _assert_every_field_set("peft.LoraConfig", args, LORA_ALGORITHM, NOT_LORA_ALGORITHM,
                            "LORA_ALGORITHM")


def test_the_lora_pins_are_the_locked_peft_defaults() -> None:
    """Pinning the adapter changed nothing under the PEFT the lock installs (see the TRL test)."""
    import peft

    from stagebudget.trlconfig import LORA_ALGORITHM

    locked = re.search(r"^peft==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert locked is not None
    if peft.__version__ != locked.group(1):
        pytest.skip(f"PEFT {peft.__version__} is not the locked {locked.group(1)}")
    fields = _fields("peft.LoraConfig")
    for name, value in LORA_ALGORITHM.items():
        field = fields[name]
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())  # type: ignore[misc]
        assert default == value, (name, default, value)


def test_the_export_and_the_trial_record_write_the_pinned_adapter() -> None:
    from peft import LoraConfig

    from stagebudget.trlconfig import LORA_ALGORITHM

    entry = stage_export(StageSpec(kind="rl", steps=10, lora_rank=4), 0, seed=0, device="cpu")
    for name, value in LORA_ALGORITHM.items():
        assert entry["peft"][name] == value, name
    LoraConfig(**entry["peft"])  # constructs as written
    assert stage_export(StageSpec(kind="sft", steps=10, lora_rank=0), 0, seed=0,
                        device="cpu")["peft"] is None

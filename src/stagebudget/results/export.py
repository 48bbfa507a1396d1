"""Export one trial of a run: its schedule (re-runnable) plus the equivalent TRL/PEFT settings.

The file's ``schedule:`` key is what ``stagebudget train FILE`` reads (see ``Schedule.load``);
``trl:`` lists, per stage, the ``trl.SFTConfig``/``trl.GRPOConfig`` arguments (for the machine
kind the trial trained on, ``device:``) and the ``peft.LoraConfig`` kwargs a user can take to
their own pipeline, read from the one mapping that training uses
(:mod:`stagebudget.trlconfig`). Beside it, ``FILE.py`` trains the schedule in plain TRL +
PEFT (see :mod:`stagebudget.results.exportscript`). Nothing heavy is imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagebudget.errors import RunError, UserError
from stagebudget.fileio import atomic_write_text, atomic_write_yaml, read_yaml
from stagebudget.kinds import get_kind
from stagebudget.names import (
    FAILED,
    ID_ACCURACY,
    OOD_ACCURACY,
    PLANNED_DEVICE_HOURS,
    RUNNING,
    STANDARD_ERROR_OF,
    TORCH_THREADS,
)
from stagebudget.pareto import compute_front
from stagebudget.results.budgetcurve import (
    CURVE_DIRECTIONS,
    CURVE_OBJECTIVES,
    CURVE_REF,
    Candidate,
    checkpoint_candidates,
    fits,
    parse_budget,
)
from stagebudget.results.exportscript import render_script
from stagebudget.schedule import Schedule, StageSpec
from stagebudget.trlconfig import (
    config_class,
    corpus_name,
    corpus_size,
    lora_kwargs,
    precision_kwargs,
    trl_config_kwargs,
)

if TYPE_CHECKING:
    from stagebudget.pareto import FrontInfo
    from stagebudget.results.run import Run

PICK_FORMS = ("knee", "max-ood", "max-id", "ood-at-id=X (e.g. ood-at-id=0.9)", "trial=N")
__all__ = ["config_class", "export", "export_document", "exported_threads", "lora_kwargs",
           "precision_kwargs", "resolve_pick", "stage_export", "trl_config_kwargs"]


def resolve_pick(front: FrontInfo, pick: str, states: dict[int, str] | None = None) -> int:
    """The trial number ``pick`` selects among the completed trials of ``front``.

    Raises :class:`RunError` when nothing is complete, :class:`UserError` for an unknown pick or
    one that matches no trial (saying why and what is available).
    """
    text = pick.strip().lower()
    match = re.fullmatch(r"(knee|max-ood|max-id|ood-at-id=(?P<x>.+)|trial=(?P<n>.+))", text)
    if match is None:
        raise UserError(f"unknown pick {pick!r}; allowed forms: {', '.join(PICK_FORMS)}")
    if front.empty:
        n = dict(front.counts)
        raise RunError(
            f"no completed trial to export yet ({n.get(RUNNING, 0)} running, "
            f"{n.get(FAILED, 0)} failed); wait for one to complete"
        )
    if match["n"] is not None:
        return _pick_trial(front, match["n"], states or {})
    if text == "knee":
        return front.knee if front.knee is not None else front.front[0]
    if text in ("max-id", "max-ood"):
        return _best(front, ID_ACCURACY if text == "max-id" else OOD_ACCURACY,
                     front.points.keys(), pick)
    return _ood_at_id(front, match["x"], pick)


def _need(front: FrontInfo, name: str, pick: str) -> None:
    if name not in front.objective_names:
        raise UserError(f"pick {pick!r} needs the objective {name!r}, but this run's objectives "
                        f"are {', '.join(front.objective_names)}")


def _best(front: FrontInfo, name: str, numbers: Any, pick: str) -> int:
    """Best trial by ``name`` (ties: better other objectives by front order, then lower number)."""
    _need(front, name, pick)
    sign = 1.0 if front.directions[front.objective_names.index(name)] == "maximize" else -1.0
    return max(sorted(numbers), key=lambda n: (sign * front.value(n, name), n in front.front, -n))


def _ood_at_id(front: FrontInfo, raw: str, pick: str) -> int:
    try:
        floor = float(raw)
    except ValueError:
        raise UserError(f"pick {pick!r}: {raw!r} is not a number; e.g. ood-at-id=0.9") from None
    _need(front, ID_ACCURACY, pick)
    _need(front, OOD_ACCURACY, pick)
    eligible = [n for n in front.points if front.value(n, ID_ACCURACY) >= floor - 1e-12]
    if not eligible:
        top = _best(front, ID_ACCURACY, front.points.keys(), pick)
        best = front.value(top, ID_ACCURACY)
        raise UserError(
            f"no completed trial reaches ID accuracy >= {floor:g}; the best ID accuracy is "
            f"{best:.4g} (trial {top}): lower the threshold (e.g. ood-at-id={best:.3g}) or use "
            "max-id"
        )
    return _best(front, OOD_ACCURACY, eligible, pick)


def _pick_trial(front: FrontInfo, raw: str, states: dict[int, str]) -> int:
    try:
        number = int(raw)
    except ValueError:
        raise UserError(f"trial={raw!r}: give an Optuna trial number, e.g. trial=3") from None
    if number in front.points:
        return number
    done = ", ".join(map(str, sorted(front.points)))
    why = (f"trial {number} is {states[number]}, not complete" if number in states
           else f"there is no trial {number} in this run")
    knee = f"; the knee is trial {front.knee}" if front.knee is not None else ""
    raise UserError(f"{why}; completed trials: {done}{knee}")


def export_document(run: Run, number: int, pick: str, front: FrontInfo,
                    views: list[Any] | None = None) -> dict[str, Any]:
    """The exported mapping for trial ``number`` of ``run`` (schedule, trl, objectives, source);
    ``views``: the run's trials, joined once by the caller."""
    views = run.trials() if views is None else views
    view = next((t for t in views if t.number == number), None)
    schedule = view.schedule if view is not None else None
    if view is None or schedule is None:
        raise RunError(
            f"trial {number} has no readable trial record in {run.dir.trials} (record.json with "
            "a schedule), so its schedule cannot be exported"
        )
    objectives = dict(zip(front.objective_names, front.points[number].values, strict=True))
    if view.record is not None:
        extra = {k: v for k, v in view.record.objectives.items() if k not in objectives}
        objectives.update(extra)
    source = {"run": run.name, "run_dir": str(run.dir.root), "study": run.study.study_name,
              "trial": number, "pick": pick, "reference": view.reference,
              "params": view.params, "on_front": number in front.front}
    return _document(schedule, view.record, objectives, source)


def candidate_document(run: Run, candidate: Candidate, pick: str, budget_hours: float,
                       views: list[Any]) -> dict[str, Any]:
    """The exported mapping for a checkpoint candidate (:mod:`stagebudget.results.budgetcurve`):
    the cut schedule, with ``budget_hours`` the budget it was picked within, and the
    objectives its curve point measured."""
    view = next(t for t in views if t.number == candidate.trial)
    schedule = Schedule.from_dict({**candidate.schedule, "budget_hours": budget_hours})
    objectives: dict[str, Any] = dict(candidate.values)
    objectives.update({STANDARD_ERROR_OF[n]: se for n, se in candidate.errors.items()})
    objectives[PLANNED_DEVICE_HOURS] = candidate.planned_hours
    source = {"run": run.name, "run_dir": str(run.dir.root), "study": run.study.study_name,
              "trial": candidate.trial, "pick": pick, "reference": view.reference,
              "params": view.params,
              "checkpoint": {"stage_index": candidate.stage_index, "stage": candidate.stage,
                             "step": candidate.step, "trial_end": candidate.final},
              "max_budget_device_hours": budget_hours}
    if run.per_trial_hours:
        source["max_budget_fraction"] = budget_hours / run.per_trial_hours
    return _document(schedule, view.record, objectives, source)


def _document(schedule: Schedule, record: Any, objectives: dict[str, Any],
              source: dict[str, Any]) -> dict[str, Any]:
    """An export mapping: ``schedule`` with its TRL/PEFT settings for the machine kind
    ``record`` trained on, its objectives and where it came from."""
    device = _trained_device(record)
    stages = [stage_export(spec, i, schedule.seed, device) for i, spec in enumerate(schedule.stages)]
    if record is not None:
        source["record"] = record.key
    document: dict[str, Any] = {"schedule": schedule.to_dict(), "trl": stages, "device": device,
                                "objectives": objectives, "source": source}
    threads = getattr(record, TORCH_THREADS, None)
    if threads:  # CPU results depend on it bit for bit: `train` and the script use it
        document[TORCH_THREADS] = int(threads)
    return document


def exported_threads(path: Path) -> int | None:
    """The ``torch_threads`` an export file says its trial trained with (None: not given, e.g.
    a hand-written schedule). A value that is not a positive integer is a :class:`UserError`."""
    data = read_yaml(path)
    value = data.get(TORCH_THREADS) if isinstance(data, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: field `{TORCH_THREADS}` must be a positive integer (the torch "
                        f"thread count the trial trained with), but got {value!r}; fix it or "
                        "remove it to use torch's default")
    return value


def stage_export(spec: StageSpec, index: int, seed: int, device: str) -> dict[str, Any]:
    """One stage as TRL/PEFT settings that construct and train on ``device``'s machine kind:
    ``config(output_dir=..., **args)``, ``LoraConfig(**peft)`` (None: full fine-tuning)."""
    entry = {"stage": spec.kind, "index": index, "config": config_class(spec),
             "args": {**trl_config_kwargs(spec, seed=seed), **precision_kwargs(device)},
             "peft": lora_kwargs(spec)}
    if get_kind(spec.kind).text_corpus:  # texts in one pass of the stage
        entry["corpus_size"] = corpus_size(spec)
        entry["corpus"] = corpus_name(spec)
    return entry


def _trained_device(record: Any) -> str:
    """``cuda`` or ``cpu``: the machine kind the trial trained on (its ledger says)."""
    device = str((getattr(record, "ledger", None) or {}).get("device") or "cpu")
    return "cuda" if device.startswith("cuda") else "cpu"


def export(run: Run, pick: str, out: Path, max_budget: str | None = None) -> Path:
    """Write the trial ``pick`` selects as a YAML file (atomically) and return its path.

    ``out`` may be a file path or an existing directory (the file is then named after the run
    and trial). ``stagebudget train`` re-runs the ``schedule:`` it holds exactly. With
    ``max_budget`` (a fraction of the per-trial budget, or device-hours: see
    :func:`~stagebudget.results.budgetcurve.parse_budget`) the pick is made among the trials'
    evaluated checkpoints that fit it, and the export is the cut schedule.
    """
    views = run.trials()  # one snapshot of the study joined with the records, read once
    if max_budget is not None:
        hours = parse_budget(max_budget, run.per_trial_hours)
        candidate = pick_candidate(checkpoint_candidates(views), pick, hours)
        document = candidate_document(run, candidate, pick, hours, views)
        name = f"trial{candidate.trial}-{candidate.stage}{candidate.step}"
    else:
        front = run.front(curves=False, views=views)
        states = {t.number: t.state for t in views if t.number is not None}
        number = resolve_pick(front, pick, states)
        document = export_document(run, number, pick, front, views)
        name = f"trial{number}"
    out = Path(out)
    if out.is_dir():
        out = out / f"{run.name}-{name}.yaml"
    atomic_write_yaml(out, document)
    atomic_write_text(script_path(out), render_script(document, device=document["device"],
                                                      base_model=_local_base(run, document)))
    return out


def pick_candidate(candidates: list[Candidate], pick: str, hours: float) -> Candidate:
    """The checkpoint candidate ``pick`` selects among those planned within ``hours``: the
    front's knee, max-id, max-ood or ood-at-id=X as for trials; trial=N takes that trial's
    latest checkpoint that fits."""
    fitting = [c for c in candidates if fits(c, hours)]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c.planned_hours, default=None)
        why = (f"the cheapest evaluated checkpoint ({cheapest.label}, trial {cheapest.trial}) "
               f"was planned at {cheapest.planned_hours:.4g}" if cheapest is not None
               else "the run has no evaluated checkpoint of a completed trial yet")
        raise UserError(f"no evaluated checkpoint fits --max-budget {hours:.4g} device-hours: "
                        f"{why}; give a larger budget")
    match = re.fullmatch(r"trial=(?P<n>\d+)", pick.strip().lower())
    if match is not None:
        mine = [c for c in fitting if c.trial == int(match["n"])]
        if not mine:
            trials = ", ".join(map(str, sorted({c.trial for c in fitting})))
            raise UserError(f"pick {pick!r}: trial {match['n']} has no evaluated checkpoint "
                            f"within {hours:.4g} device-hours; trials that have: {trials}")
        return max(mine, key=lambda c: (c.planned_hours, c.stage_index, c.step))
    front = compute_front([c.point() for c in fitting], CURVE_OBJECTIVES, CURVE_DIRECTIONS,
                          ref_point=CURVE_REF)
    by_number = {c.number: c for c in fitting}
    return by_number[resolve_pick(front, pick)]


def script_path(out: Path) -> Path:
    """Where the stand-alone TRL script of the export ``out`` goes: ``best.yaml`` -> ``best.py``."""
    return out.with_suffix(".py")


def _local_base(run: Run, document: dict[str, Any]) -> str | None:
    """A relative local base-model path made absolute (relative to the run's space file)."""
    base = str(document["schedule"].get("base_model", ""))
    if not base or base.startswith("builtin:") or Path(base).is_absolute():
        return None
    space_file = run.meta.get("space_file")
    root = Path(space_file).parent if isinstance(space_file, str) and space_file else Path.cwd()
    return str((root / base).resolve())

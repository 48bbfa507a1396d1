from __future__ import annotations

import pytest

from stagebudget.errors import ConfigError
from stagebudget.schedule import Schedule, StageSpec, TasksRef, label_fields


def make() -> Schedule:
    return Schedule(
        base_model="builtin:tiny",
        tasks=TasksRef(names=("translate",), n_train=100),
        stages=(
            StageSpec(kind="sft", steps=40, lora_rank=64, learning_rate=5e-4),
            StageSpec(kind="rl", steps=20, lora_rank=4, learning_rate=1e-3, batch_size=16),
        ),
        seed=3,
        budget_hours=0.01,
    )


def test_yaml_round_trip(tmp_path):
    s = make()
    s.save(tmp_path / "s.yaml")
    assert Schedule.load(tmp_path / "s.yaml") == s
    assert Schedule.from_dict(s.to_dict()) == s


def test_frozen_and_hashable():
    s = make()
    assert hash(s) == hash(make())
    assert s.digest() == make().digest()
    with pytest.raises(Exception):
        s.seed = 4  # type: ignore[misc]
    assert make().model_copy(update={"seed": 4}).digest() != s.digest()


def test_one_identity_decides_same_trained_model(tmp_path):
    """digest and trial reuse (finished_twin) agree: a display name is not identity."""
    from stagebudget.rundir import RunDir, TrialRecord
    from stagebudget.searching.trainable import finished_twin

    a, b = make().model_copy(update={"name": "a"}), make().model_copy(update={"name": "b"})
    assert a.digest() == b.digest()
    run = RunDir(tmp_path)
    run.write_record(TrialRecord(key="t1", params={}, schedule=a.to_dict(), status="COMPLETE",
                                 objectives={"id_accuracy": 0.5}))
    assert finished_twin(run, b.to_dict(), exclude="t2").key == "t1"
    c = make().model_copy(update={"seed": 9})
    assert c.digest() != a.digest() and finished_twin(run, c.to_dict(), exclude="t2") is None


def test_rl_defaults_filled_only_for_rl():
    s = make()
    rl = s.stage("rl")
    assert rl is not None and rl.num_generations == 8 and rl.beta == 0.0
    sft = s.stage("sft")
    assert sft is not None and sft.num_generations is None
    assert sft.alpha == 128


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"stages": [{"kind": "sft", "steps": 0}]}, "stages.0.steps"),
        ({"stages": [{"kind": "sfx", "steps": 3}]}, "allowed: cpt, sft, rl"),
        ({"stages": [{"kind": "sft", "steps": 3, "beta": 0.1}]}, "applies only to rl"),
        ({"stages": [{"kind": "sft", "steps": 3, "corpus": "raw"}]}, "applies only to cpt"),
        ({"stages": [{"kind": "cpt", "steps": 3, "corpus": "tasks"}]}, "'mixture' or 'raw'"),
        ({"stages": [{"kind": "sft", "steps": 3, "lora_rank": -1}]}, "lora_rank"),
        ({"stages": [{"kind": "sft", "steps": 3, "bogus": 1}]}, "unknown key `bogus`"),
        ({"stages": []}, "at least one stage"),
        ({"stages": [{"kind": "sft", "steps": 3}, {"kind": "cpt", "steps": 3}]}, "cpt stage may only"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_schedules_name_the_field(data, needle):
    with pytest.raises(ConfigError) as err:
        Schedule.from_dict(data, source="sched.yaml")
    assert "sched.yaml" in str(err.value)
    assert needle in str(err.value)


def test_export_wrapper_is_accepted(tmp_path):
    path = tmp_path / "best.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"schedule": make().to_dict(), "trl": {}}))
    assert Schedule.load(path) == make()


def test_labels_show_every_setting_in_which_schedules_differ():
    """Issue 21: two schedules differing only in the SFT learning rate were both labelled
    `sft 409@r16`; a label shows every setting that differs, and omits those that do not."""
    def sft(lr: float, **kw) -> Schedule:
        return Schedule(stages=(StageSpec(kind="sft", steps=409, lora_rank=16, learning_rate=lr,
                                          batch_size=64),), **kw)

    a, b = sft(1e-3), sft(3e-3)
    fields = label_fields([a, b])
    assert fields == {"sft.learning_rate"}
    assert [s.describe(fields) for s in (a, b)] == ["sft 409@r16 lr=1e-3", "sft 409@r16 lr=3e-3"]
    assert a.describe() == "sft 409@r16"  # no context: steps and ranks only
    # the planner's evaluation interval follows the steps: not a difference of its own
    assert label_fields([a, a.model_copy(update={"stages": (
        a.stages[0].model_copy(update={"eval_interval": 100}),)})]) == frozenset()
    # a schedule without the stage does not make its settings differ; steps/ranks always show
    rl = Schedule(stages=(StageSpec(kind="rl", steps=20, lora_rank=4),))
    assert label_fields([a, a.model_copy(update={"seed": 1}), rl]) == {"seed"}
    assert a.model_copy(update={"seed": 1}).describe({"seed"}) == "sft 409@r16, seed=1"
    # a searched setting is shown even before two trials differ in it (stable labels)
    assert label_fields([a], searched=["sft.learning_rate", "sft.share", "sft.lora_rank"]) == {
        "sft.learning_rate"}
    # an unset alpha follows the rank (not a difference); a set one is shown as trained
    c = Schedule(stages=(StageSpec(kind="sft", steps=409, lora_rank=16, lora_alpha=8,
                                   learning_rate=1e-3, batch_size=64),))
    assert c.describe(label_fields([a, c])) == "sft 409@r16 alpha=8"
    assert a.describe(label_fields([a, c])) == "sft 409@r16 alpha=32"


def test_a_cpt_corpus_is_written_only_when_set():
    """Unset, ``corpus`` is not serialised (every existing schedule keeps its digest); set, it is
    another schedule and another prefix-cache key."""
    plain = Schedule(stages=(StageSpec(kind="cpt", steps=3),))
    mixture = Schedule(stages=(StageSpec(kind="cpt", steps=3, corpus="mixture"),))
    raw = Schedule(stages=(StageSpec(kind="cpt", steps=3, corpus="raw"),))
    assert "corpus" not in plain.to_dict()["stages"][0]
    assert raw.to_dict()["stages"][0]["corpus"] == "raw"
    assert len({plain.digest(), raw.digest()}) == 2
    assert Schedule.from_dict(raw.to_dict()) == raw
    assert mixture.stages[0].corpus == "mixture"

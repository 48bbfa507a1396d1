"""Bad input is refused before any compute, with one paragraph naming file, field and value, and
nothing written; `validate` and `search` run the same checks (issue 14's classes, one test each).
No Ray is started here: every case must fail before it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from stagebudget.errors import ConfigError, RunError, UserError
from stagebudget.schedule import Schedule
from stagebudget.searching.driver import run_search
from stagebudget.searching.preflight import check_space
from stagebudget.space.schema import SearchSpace

GOOD = {
    "name": "t",
    "budget": {"per_trial_hours": 0.01},
    "stages": {"sft": {"share": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25}},
               "rl": {"share": "rest"}},
}


def space_file(tmp_path: Path, **changes) -> Path:
    data = json.loads(json.dumps(GOOD))
    data.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fake_fn(*args, **kwargs):  # pragma: no cover - never reached: every case fails before Ray
    raise AssertionError("a trial started")


# --- validate and search: the same checks, all before anything is written -------------------
BAD_SPACES = {
    "rl-only rest share": dict(stages={"rl": {"share": "rest"}}),
    "negative searched steps": dict(stages={"sft": {"steps": {"type": "int", "low": -4,
                                                              "high": 8}}}),
    "concurrency above the machine": dict(concurrency=(os.cpu_count() or 1) * 4),
    "unknown device": dict(device="tpu"),
    "cuda without a GPU per trial": dict(device="cuda"),
    "bogus sampler option": dict(sampler={"name": "tpe", "options": {"bogus": 1}}),
    "trust_remote_code as a string": dict(trust_remote_code="yes"),
    "absurd trial count": dict(trials=10**9),
    "absurd per-trial budget": dict(budget={"per_trial_hours": 1e6}),
    "a cache cap below one entry": dict(reuse={"max_gb": 1e-6}),
    "share step not dividing the range": dict(stages={
        "sft": {"share": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.3}},
        "rl": {"share": "rest"}}),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_validate_and_search_refuse_the_same_spaces_before_writing(tmp_path, case):
    path = space_file(tmp_path, **BAD_SPACES[case])
    with pytest.raises(UserError) as validated:
        check_space(path)  # what `stagebudget validate` runs
    assert str(path) in str(validated.value)
    runs = tmp_path / "runs"
    with pytest.raises(UserError) as searched:
        run_search(path, runs_dir=runs, live=False, trial_fn=fake_fn)
    assert str(searched.value) == str(validated.value)
    assert not runs.exists()  # no run directory left behind to block the name


def test_the_clean_space_passes(tmp_path):
    assert check_space(space_file(tmp_path)).name == "t"


@pytest.mark.parametrize("name", ["../escape", "a/b", "/tmp/abs", "..", "x" * 200])
def test_run_name_flag_cannot_leave_the_runs_dir(tmp_path, name):
    with pytest.raises(UserError, match="--name"):
        run_search(space_file(tmp_path), name=name, runs_dir=tmp_path / "runs", live=False,
                   trial_fn=fake_fn)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()


def test_runs_dir_that_is_a_file(tmp_path):
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    with pytest.raises(UserError, match="is a file"):
        run_search(space_file(tmp_path), runs_dir=runs, live=False, trial_fn=fake_fn)


def test_search_budget_too_small_for_one_trial(tmp_path):
    with pytest.raises(UserError, match="no trial could start"):
        run_search(space_file(tmp_path), runs_dir=tmp_path / "runs", budget_hours=0.001,
                   live=False, trial_fn=fake_fn)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("hours", [0, -1, float("nan"), float("inf")])
def test_search_budget_must_be_a_positive_number(tmp_path, hours):
    with pytest.raises(UserError, match="--budget-hours"):
        check_space(space_file(tmp_path), search_hours=hours)


def test_trust_remote_code_must_be_a_real_boolean(tmp_path):
    with pytest.raises(ConfigError, match="trust_remote_code"):
        Schedule.from_dict({"stages": [{"kind": "sft", "steps": 2}], "trust_remote_code": "yes"},
                           source="s.yaml")
    assert SearchSpace.load(space_file(tmp_path, trust_remote_code=True)).trust_remote_code


def test_absurd_budget_gives_the_reason(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_space(space_file(tmp_path, budget={"per_trial_hours": 1e6}))
    assert "budget.per_trial_hours" in str(err.value) and "hours" in str(err.value)


def test_step_that_does_not_divide_the_range_names_both(tmp_path):
    path = space_file(tmp_path, **BAD_SPACES["share step not dividing the range"])
    with pytest.raises(ConfigError, match=r"stages\.sft\.share.*does not divide"):
        SearchSpace.load(path)


# --- files that are not UTF-8 text, or not what they claim to be -----------------------------
def test_non_utf8_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"name: t\nbudget: \xff\xfe\x00\x01\n")
    with pytest.raises(ConfigError) as err:
        SearchSpace.load(path)
    assert str(path) in str(err.value) and "UTF-8" in str(err.value)


def test_non_utf8_run_json(tmp_path):
    from stagebudget.results.run import load_run

    (tmp_path / "run.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(RunError, match=r"run\.json.*UTF-8"):
        load_run(tmp_path)


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    from stagebudget.tasks import load_suite

    path = tmp_path / "tasks.jsonl"
    good = json.dumps({"prompt": "a", "answer": "b", "split": "train"}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "\xff", "answer": "b", "split": "train"}\n')
    with pytest.raises(ValueError) as err:
        load_suite(str(path), scorer="exact")
    assert f"{path}, line 2" in str(err.value) and "UTF-8" in str(err.value)


def _model_dir(tmp_path: Path) -> Path:
    """A local model directory with a valid-looking layout (config, tokenizer, safetensors)."""
    import numpy as np
    from safetensors.numpy import save_file

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 1,
                                                   "intermediate_size": 16, "vocab_size": 10}))
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(model / "model.safetensors"))
    return model


@pytest.mark.parametrize("damage", ["config", "tokenizer", "truncated"])
def test_damaged_local_model_named_before_compute(tmp_path, damage):
    model = _model_dir(tmp_path)
    if damage == "config":
        (model / "config.json").write_text("{not json")
    elif damage == "tokenizer":
        (model / "tokenizer.json").write_bytes(b"\xff\xfe")
    else:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    path = space_file(tmp_path, base_model=str(model))
    with pytest.raises(UserError) as err:
        check_space(path)
    text = str(err.value)
    assert str(path) in text and "base_model" in text
    assert {"config": "config.json", "tokenizer": "tokenizer.json",
            "truncated": "truncated"}[damage] in text


def test_intact_local_model_passes_the_file_checks(tmp_path):
    from stagebudget.space.inputs import check_model_files

    check_model_files(_model_dir(tmp_path), "space.yaml")


# --- train writes nothing on bad input ---------------------------------------------------------
@pytest.mark.parametrize("problem", ["missing model", "missing tasks", "bad row", "out is a file",
                                     "unknown device", "chat tasks, built-in model"])
def test_train_writes_nothing_on_bad_input(tmp_path, capsys, problem):
    from stagebudget.cli import main

    schedule = {"stages": [{"kind": "sft", "steps": 2}], "base_model": "builtin:test"}
    tasks = tmp_path / "tasks.jsonl"
    if problem == "missing model":
        schedule["base_model"] = str(tmp_path / "nowhere")
    elif problem == "missing tasks":
        schedule["tasks"] = {"source": str(tmp_path / "none.jsonl"), "scorer": "exact"}
    elif problem == "bad row":
        tasks.write_text('{"prompt": "a", "answer": "b", "split": "train"}\n{"prompt": 1}\n')
        schedule["tasks"] = {"source": str(tasks), "scorer": "exact"}
    elif problem == "chat tasks, built-in model":  # the built-in model has no chat template
        chat = [{"role": "user", "content": "a"}]
        tasks.write_text("".join(json.dumps({"prompt": chat, "answer": a, "split": s}) + "\n"
                                 for a, s in (("b", "train"), ("c", "id_test"), ("d", "ood_test"))))
        schedule["tasks"] = {"source": str(tasks)}
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(schedule))
    out = tmp_path / "out"
    if problem == "out is a file":
        out.write_text("")
        schedule["base_model"] = str(tmp_path / "nowhere")
    device = ["--device", "tpu"] if problem == "unknown device" else []
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "-o", str(out), *device])
    assert exit_.value.code == 2
    assert not out.is_dir()
    if problem.startswith("chat"):  # refused by the input checks, naming the schedule file
        err = capsys.readouterr().err
        assert str(path) in err and "field `tasks`" in err and "no chat template" in err


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b'{"entries": [{"kind": "sft"}]}'])
def test_damaged_cost_table_is_named(tmp_path, content):
    table = tmp_path / "cost.json"
    table.write_bytes(content)
    with pytest.raises(UserError) as err:
        check_space(space_file(tmp_path, cost_table=str(table)))
    assert str(table) in str(err.value)


def test_validate_prints_task_warnings_after_the_summary(tmp_path, capsys):
    """search and validate share check_space; validate shows its warnings after the summary."""
    from stagebudget.cli import main

    rows = [("1+1=", "2", "train"), ("2+2=", "4", "train"), ("1+1=", "2", "id_test"),
            ("3+3=", "6", "ood_test")]
    (tmp_path / "tasks.jsonl").write_text("".join(
        json.dumps({"prompt": p, "answer": a, "split": s}) + "\n" for p, a, s in rows))
    path = space_file(tmp_path, tasks={"source": "tasks.jsonl"})
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(path)])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "1 of 1 id_test prompts also appear in train" in out
    assert out.index("is valid") < out.index("warning:")


def test_characters_the_builtin_tokenizer_lacks_are_named_by_validate_and_search(tmp_path,
                                                                                 capsys):
    """`é` and `😀` become <unk> in the built-in character tokenizer: validate and search (both
    check_space) warn before any compute, naming the file, the line, the field and each
    character; plain ASCII rows give no such warning."""
    from stagebudget.cli import main

    rows = [("1+1=", "2", "train"), ("caf\u00e9:\U0001F600=", "2", "train"),
            ("1+2=", "3", "id_test"), ("3+3=", "\u00e9", "ood_test")]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p, "answer": a, "split": s}) + "\n"
                             for p, a, s in rows))
    path = space_file(tmp_path, tasks={"source": "tasks.jsonl"})
    warnings: list[str] = []
    check_space(path, warn=warnings.append)  # what `search` runs first
    (text,) = [w for w in warnings if "lacks" in w]
    assert str(tasks.resolve()) in text and "2 field(s)" in text
    assert "line 2 prompt: 'é' (U+00E9), '😀' (U+1F600)" in text
    assert "line 4 answer: 'é' (U+00E9)" in text and "printable ASCII" in text
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(path)])
    assert exit_.value.code == 0 and "line 2 prompt: 'é'" in capsys.readouterr().out
    tasks.write_text("".join(json.dumps({"prompt": p, "answer": "2", "split": s}) + "\n"
                             for p, _, s in [rows[0], rows[0], rows[2], rows[3]]))
    warnings.clear()
    check_space(path, warn=warnings.append)
    assert not [w for w in warnings if "lacks" in w]


# --- a huge prompt is refused before compute, naming file, line, length and limit -------------
def _huge_task_file(tmp_path: Path, chars: int = 1_000_000) -> Path:
    rows = [("1+1=", "2", "train"), ("x" * chars + "=", "4", "train"), ("1+2=", "3", "id_test"),
            ("3+3=", "6", "ood_test")]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "split": s}) + "\n"
                            for p, a, s in rows))
    return path


def test_huge_prompt_refused_by_validate_and_search(tmp_path):
    tasks = _huge_task_file(tmp_path)
    path = space_file(tmp_path, base_model="builtin:test",
                      tasks={"source": str(tasks), "scorer": "exact"})
    with pytest.raises(UserError) as err:
        check_space(path)
    text = str(err.value)
    assert f"{tasks}, line 2" in text and "field `tasks`" in text
    assert "1000002 tokens" in text and "has 128" in text and "Shorten or remove" in text
    runs = tmp_path / "runs"
    with pytest.raises(UserError):
        run_search(path, runs_dir=runs, live=False, trial_fn=fake_fn)
    assert not runs.exists()


def test_huge_prompt_refused_by_train_before_writing(tmp_path, capsys):
    from stagebudget.cli import main

    tasks = _huge_task_file(tmp_path)
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"kind": "rl", "steps": 2}],
                                    "base_model": "builtin:test",
                                    "tasks": {"source": str(tasks), "scorer": "exact"}}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "-o", str(out)])
    assert exit_.value.code == 2 and not out.exists()
    assert f"{tasks}, line 2" in capsys.readouterr().err


def test_prompt_at_the_window_edge_passes_one_more_is_refused(tmp_path):
    # builtin:test has 128 positions; the space's RL stage writes up to its default
    # max_completion_length after a prompt (more than evaluation's longest answer + 2), so a
    # prompt may be 128 - that many tokens: BOS + the rest in characters.
    from stagebudget.kinds import get_kind
    from stagebudget.modelref import MAX_LEN

    fits = MAX_LEN - get_kind("rl").defaults["max_completion_length"] - 1  # characters
    for chars, ok in ((fits, True), (fits + 1, False)):
        tasks = _huge_task_file(tmp_path, chars=chars - 1)  # the row adds "="
        path = space_file(tmp_path, base_model="builtin:test",
                          tasks={"source": str(tasks), "scorer": "exact"})
        if ok:
            check_space(path)
        else:
            with pytest.raises(UserError, match="line 2"):
                check_space(path)


def test_builtin_token_count_matches_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from stagebudget.modelref import builtin_token_count
    from stagebudget.training.model import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("tl11:ATGTGG=", "", "é ü  x=", "x" * 300):
        assert builtin_token_count(text) == len(tok(text=text)["input_ids"])
        assert builtin_token_count(text, bos=False) == len(
            tok(text=text, add_special_tokens=False)["input_ids"])


def test_local_model_window_read_from_its_config(tmp_path):
    from stagebudget.modelref import position_window

    model = _model_dir(tmp_path)
    assert position_window(str(model)) is None
    (model / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 77}}))
    assert position_window(str(model)) == 77
    assert position_window("builtin:tiny") == 128


def test_rl_generation_longer_than_the_window_names_the_setting(tmp_path):
    import pickle

    from stagebudget.chat import GenerationTooLong

    path = space_file(tmp_path, base_model="builtin:test", stages={
        "sft": {"share": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.5}},
        "rl": {"share": "rest", "max_completion_length": {"type": "int", "low": 8, "high": 500}}})
    with pytest.raises(UserError) as err:
        check_space(path)
    text = str(err.value)
    assert "field `stages.rl.max_completion_length`" in text and "500 tokens" in text
    assert "has 128 positions" in text
    again = pickle.loads(pickle.dumps(GenerationTooLong("m", field="f")))
    assert (str(again), again.field) == ("m", "f")


def test_rl_generation_counts_against_a_long_prompt(tmp_path):
    # a 100-token prompt fits evaluation (3 tokens after it) but not RL's 40-token completions
    tasks = _huge_task_file(tmp_path, chars=98)
    stages = {"sft": {"share": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.5}},
              "rl": {"share": "rest", "max_completion_length": 20}}
    path = space_file(tmp_path, base_model="builtin:test", stages=stages,
                      tasks={"source": str(tasks), "scorer": "exact"})
    check_space(path)
    stages["rl"]["max_completion_length"] = 40
    path = space_file(tmp_path, base_model="builtin:test", stages=stages,
                      tasks={"source": str(tasks), "scorer": "exact"})
    with pytest.raises(UserError, match="line 2: the prompt is 100 tokens long and 40 more"):
        check_space(path)


def test_a_cache_cap_below_one_entry_names_the_field_and_the_size(tmp_path):
    """The widest stage (full fine-tuning of builtin:tiny) writes ~12 bytes per parameter;
    a cap below it is refused, a cap above it and no cap at all pass."""
    full = {"sft": {**GOOD["stages"]["sft"], "lora_rank": 0}, "rl": {"share": "rest"}}
    with pytest.raises(UserError) as refused:
        check_space(space_file(tmp_path, stages=full, reuse={"max_gb": 1e-3}))
    text = str(refused.value)
    assert "reuse.max_gb = 0.001" in text and "GB" in text
    assert check_space(space_file(tmp_path, stages=full, reuse={"max_gb": 1.0})).name == "t"
    space = check_space(space_file(tmp_path, stages=full))
    assert space.reuse.max_gb is None and space.reuse.cache(10**6).max_bytes == 20e9

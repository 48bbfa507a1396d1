"""A real user: their own local chat model, a chat-message task file and their own scorer.

The model directory is built here from ``examples/own_model/make_model.py`` (byte-level BPE
trained on the fly, ChatML template, tiny Llama, safetensors, two declared stop tokens), from
the same files the README's "Your own model and tasks" section uses.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagebudget import cli
from stagebudget.chat import check_model_tasks, prompt_completion_ids, prompt_ids, stop_token_ids
from stagebudget.tasks import Example, TaskFileError, load_suite

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"
SCORER = "my_scorer.py:base_match"


def _make_model_module() -> Any:
    spec = importlib.util.spec_from_file_location("own_make_model", EXAMPLE / "make_model.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: the example files and a freshly built model directory."""
    folder = tmp_path_factory.mktemp("own")
    for name in ("tasks.jsonl", "my_scorer.py", "space.yaml"):
        shutil.copy(EXAMPLE / name, folder / name)
    _make_model_module().build_model(folder / "model", folder / "tasks.jsonl")
    return folder


@pytest.fixture(scope="module")
def model_and_tokenizer(own: Path) -> tuple[Any, Any]:
    from stagebudget.training.model import load_model_and_tokenizer

    return load_model_and_tokenizer(own / "model")


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_chat_prompts_get_one_bos_and_the_model_declares_both_stop_tokens(own, model_and_tokenizer):
    model, tok = model_and_tokenizer
    suite = load_suite(str(own / "tasks.jsonl"), scorer=SCORER, answer="answer_tag", base_dir=own)
    assert suite.conversational and suite.sizes() == {"n_train": 300, "n_id_test": 40,
                                                      "n_ood_test": 40}
    ids = prompt_ids(tok, suite.train[0].prompt)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    full = prompt_completion_ids(tok, suite.train[0])
    assert full[:len(ids)] == ids and full.count(tok.bos_token_id) == 1
    assert stop_token_ids(model, tok) == _ids(tok, "</s>", "<|im_end|>")
    assert check_model_tasks(tok, suite) == []


def test_a_template_typed_into_a_text_prompt_doubles_bos_and_is_refused(own, model_and_tokenizer):
    _, tok = model_and_tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Reverse complement of ACG"}],
                                   add_generation_prompt=True, tokenize=False)
    rows = [{"prompt": text, "answer": "CGT", "split": s} for s in ("train", "id_test", "ood_test")]
    (own / "typed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = load_suite(str(own / "typed.jsonl"))
    with pytest.raises(ValueError, match="BOS token '<s>' twice"):
        check_model_tasks(tok, suite)


def test_a_prompt_that_merges_with_its_answer_is_reported_once_naming_an_example(
        own, model_and_tokenizer):
    _, tok = model_and_tokenizer
    merged = None
    for seq in ("AACTA", "TAGTT", "CGGCA", "GCTTA", "ACGTAC", "TTGCA"):
        for cut in range(1, len(seq)):
            ex = Example(f"Reverse complement of {seq[:cut]}", seq[cut:], "user", "train")
            if prompt_completion_ids(tok, ex)[:len(prompt_ids(tok, ex.prompt))] != \
                    prompt_ids(tok, ex.prompt):
                merged = ex
                break
        if merged:
            break
    assert merged is not None, "the BPE vocabulary should merge some prompt end with an answer"
    rows = [{"prompt": merged.prompt, "answer": merged.answer, "split": "train"},
            {"prompt": "Reverse complement of A", "answer": "T", "split": "id_test"},
            {"prompt": "Reverse complement of C", "answer": "G", "split": "ood_test"}]
    (own / "merge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    warnings = check_model_tasks(tok, load_suite(str(own / "merge.jsonl")))
    assert len(warnings) == 1 and "1 of 1 training prompts are not a prefix" in warnings[0]
    assert "merges with the answer" in warnings[0]
    assert repr(merged.prompt) in warnings[0]


def test_generation_stops_at_a_stop_token_the_model_declares(model_and_tokenizer):
    from reference_generate import generate_greedy

    model, tok = model_and_tokenizer
    prompt = [{"role": "user", "content": "Reverse complement of ACGTA"}]
    before = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tok.eos_token_id]
        free = model.generate(**_batch(tok, prompt), max_new_tokens=12, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])
        new = free[0, len(prompt_ids(tok, prompt)):].tolist()
        unstopped = generate_greedy(model, tok, [prompt], 12)
        stop = new[-1]  # declare a token the model writes as one more stop token
        model.generation_config.eos_token_id = [tok.eos_token_id, stop]
        stopped = generate_greedy(model, tok, [prompt], 12)
    finally:
        model.generation_config.eos_token_id = before
    assert unstopped == [tok.decode(new, skip_special_tokens=True)]
    assert stopped == [tok.decode(new[:new.index(stop)], skip_special_tokens=True)]
    assert stopped != unstopped


def _batch(tok: Any, prompt: Any) -> dict[str, Any]:
    import torch

    ids = torch.tensor([prompt_ids(tok, prompt)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_the_readme_space_validates_and_prints_the_task_file(own, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["validate", str(own / "space.yaml")])
    assert done.value.code == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert str(own / "tasks.jsonl") in out and "(default set)" not in out
    assert "train 300, id_test 40, ood_test 40" in out and "answer_tag" in out


def test_train_with_an_unknown_scorer_names_the_file_and_writes_nothing(own, tmp_path, capsys):
    schedule = {"base_model": str(own / "model"),
                "tasks": {"source": str(own / "tasks.jsonl"), "scorer": "no_such:thing"},
                "stages": [{"kind": "sft", "steps": 1}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(schedule))
    with pytest.raises(SystemExit) as done:
        cli.main(["train", str(path), "-o", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert str(own / "tasks.jsonl") in err and "no_such" in err
    assert not (tmp_path / "out").exists()


def test_a_broken_scorer_fails_at_load_naming_the_file(own, tmp_path):
    (tmp_path / "bad_scorer.py").write_text("def score(prediction, answer):\n    return 2.0\n")
    with pytest.raises(TaskFileError, match=r"returned 2.0.*in \[0, 1\]"):
        load_suite(str(own / "tasks.jsonl"), scorer="bad_scorer.py:score", base_dir=tmp_path)


class _Recorder:
    """What the model is fed (forward passes of 2+ tokens) and what generate returns."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.generated: list[tuple[list[int], list[int]]] = []

    def attach(self, model: Any) -> Any:
        def on_forward(_module: Any, args: Any, kwargs: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[-1] > 1:
                self.rows += ids.tolist()

        model.register_forward_pre_hook(on_forward, with_kwargs=True)
        generate = model.generate

        def recording_generate(*args: Any, **kwargs: Any) -> Any:
            out = generate(*args, **kwargs)
            width = kwargs["input_ids"].shape[1]
            for prompt, row in zip(kwargs["input_ids"].tolist(), out.tolist(), strict=True):
                self.generated.append((prompt, row[width:]))
            return out

        model.generate = recording_generate
        return model


@pytest.mark.slow
def test_real_user_validate_search_export_train(own, tmp_path, monkeypatch, capsys):
    from stagebudget.rundir import RunDir
    from stagebudget.searching.driver import run_search
    from stagebudget.training import model as basemodel

    data = yaml.safe_load((own / "space.yaml").read_text())
    data.update(name="own-e2e", budget={"per_trial_hours": 0.05})  # generous: load varies
    data["stages"]["sft"].update(share=None, steps={"type": "categorical", "choices": [60, 80]},
                                 eval_interval=20)
    data["stages"]["rl"].update(share=None, steps=2, eval_interval=20)
    del data["stages"]["sft"]["max_length"]  # the default: the longest tokenised example
    data["stages"] = {k: {f: v for f, v in d.items() if v is not None}
                      for k, d in data["stages"].items()}
    space = own / "e2e.yaml"
    space.write_text(yaml.safe_dump(data))

    with pytest.raises(SystemExit) as done:
        cli.main(["validate", str(space)])
    assert done.value.code == 0

    run_dir = run_search(space, runs_dir=tmp_path / "runs", live=False)
    records = list(RunDir(run_dir).records())
    assert len(records) == 2 and all(r.status == "COMPLETE" for r in records), \
        [r.error for r in records]
    tasks = records[0].schedule["tasks"]
    assert (tasks["n_train"], tasks["n_id_test"], tasks["n_ood_test"]) == (300, 40, 40)

    exported = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as done:
        cli.main(["export", str(run_dir), "--pick", "max-id", "-o", str(exported)])
    assert done.value.code == 0

    recorder = _Recorder()
    load = basemodel.load_model_and_tokenizer

    def load_and_record(*args: Any, **kwargs: Any) -> Any:
        model, tok = load(*args, **kwargs)
        recorder.tok = tok
        return recorder.attach(model), tok

    monkeypatch.setattr(basemodel, "load_model_and_tokenizer", load_and_record)
    with pytest.raises(SystemExit) as done:
        cli.main(["train", str(exported), "-o", str(tmp_path / "trained"), "--no-save"])
    assert done.value.code == 0, capsys.readouterr().err
    _assert_tokens_seen(recorder)


def _assert_tokens_seen(recorder: _Recorder) -> None:
    tok = recorder.tok
    bos, pad = tok.bos_token_id, tok.pad_token_id
    im_start, im_end = _ids(tok, "<|im_start|>", "<|im_end|>")
    assert recorder.rows and recorder.generated
    for row in recorder.rows:  # SFT batches, GRPO scoring passes, evaluation prefill
        real = [t for t in row if t != pad]
        assert real[0] == bos and real.count(bos) == 1, tok.convert_ids_to_tokens(real[:4])
        assert im_start in real
    opener = tok.apply_chat_template([{"role": "user", "content": "x"}],
                                     add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"][-3:]
    stops = {tok.eos_token_id, im_end}
    ended = 0
    for prompt, new in recorder.generated:  # evaluation and GRPO generation
        assert prompt[-3:] == opener  # ...<|im_start|>assistant\n: the template's own prompt
        first = next((i for i, t in enumerate(new) if t in stops), None)
        if first is not None:
            ended += new[first] == im_end
            assert all(t == pad for t in new[first + 1:]), tok.convert_ids_to_tokens(new)
    assert ended > 0, "the model never wrote the template's end token <|im_end|>"


def test_calibrating_a_relative_model_path_on_own_tasks_is_found_by_the_space(
        own, tmp_path, monkeypatch, one_thread):
    from stagebudget.space.schema import SearchSpace
    from stagebudget.training.calibrate import calibrate

    monkeypatch.setenv("STAGEBUDGET_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(own)
    cost = calibrate("model", device="cpu", kinds=("sft",), ranks=(0,), steps=1,
                     tasks="tasks.jsonl")
    assert cost.table[0]["seconds_per_step"] > 0
    assert cost.seq_len == 64  # the longest tokenised example of the task file
    from stagebudget.schedule import StageSpec

    measured = StageSpec(kind="sft", steps=1, lora_rank=0, batch_size=cost.table[0]["batch"])
    assert cost.step_seconds(measured.model_copy(update={"max_length": 64})) == \
        pytest.approx(cost.table[0]["seconds_per_step"])  # not scaled twice
    monkeypatch.chdir(tmp_path)  # validate and search read the space from anywhere
    assert SearchSpace.load(own / "space.yaml").cost_model("cpu").source == cost.source


@pytest.mark.slow
def test_hundreds_of_tokens_plan_and_run(own, tmp_path, one_thread):
    from stagebudget.plan.cost import Budget, default_cost_model, plan_schedule
    from stagebudget.schedule import TasksRef
    from stagebudget.training.pipeline import run_schedule

    tasks = TasksRef(source=str(own / "tasks.jsonl"), scorer=f"{own / SCORER}",
                     answer="answer_tag", max_new_tokens=300)
    rl = {"lora_rank": 4, "batch_size": 2, "num_generations": 2, "max_completion_length": 300}
    cost = default_cost_model(str(own / "model"))
    schedule = plan_schedule({"sft": 1, "rl": 1}, {"sft": {"max_length": 512}, "rl": rl},
                             Budget(hours=1.0), cost, mode="steps",
                             base_model=str(own / "model"), tasks=tasks)
    short = schedule.stages[1].model_copy(update={"max_completion_length": 12})
    # sampling pays per generated token (~1.6 ms at 4 rows on the tiny model, idle): 300 tokens
    # must be priced far above 12 (without a per-token cost the ratio was 1.7)
    assert cost.step_seconds(schedule.stages[1]) > 8 * cost.step_seconds(short)
    result = run_schedule(schedule, tmp_path / "out", device="cpu")
    assert [s["steps_done"] for s in result.metrics["stages"]] == [1, 1]

"""Tests for the task suite: labels, splits, determinism, user files, scorers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from Bio.Restriction import Restriction
from Bio.Seq import Seq

from stagebudget.tasks import (
    DEFAULT_TASKS,
    SCORERS,
    SPLITS,
    Example,
    TaskFileError,
    builtin_task_names,
    load_suite,
    pretrain_corpus,
    render_examples,
    task_infos,
)
from stagebudget.tasks.builtin import translate


@pytest.fixture(scope="module")
def full_suite():
    return load_suite(names=builtin_task_names(), n_train=900, n_id_test=180, n_ood_test=180)


def _seq(ex: Example) -> str:
    return ex.prompt.split(":", 1)[1].rstrip("=")


def _rule(ex: Example) -> str:
    return ex.prompt.split(":", 1)[0]


def test_import_is_light():
    code = ("import sys, stagebudget.tasks; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_three_domains_three_tasks_each():
    domains: dict[str, int] = {}
    for info in task_infos():
        domains[info.domain] = domains.get(info.domain, 0) + 1
        assert info.scorer in SCORERS and info.ood_split and info.id_split
    assert {d for d, n in domains.items() if n >= 3} >= {"genomics", "transcriptomics", "proteins"}
    assert set(DEFAULT_TASKS) <= set(builtin_task_names())


def test_sizes_and_lengths(full_suite):
    assert len(full_suite.train) == 900
    assert len(full_suite.id_test) == 180 and len(full_suite.ood_test) == 180
    for s in SPLITS:
        for ex in full_suite.split(s):
            assert ex.split == s and ex.answer and len(ex.prompt + ex.answer) <= 64
            assert full_suite.score(ex, ex.answer) == 1.0


def test_splits_share_no_sequences(full_suite):
    for task in full_suite.tasks:
        train = {_seq(e) for e in full_suite.train if e.task == task}
        for s in ("id_test", "ood_test"):
            assert not train & {_seq(e) for e in full_suite.split(s) if e.task == task}


def test_deterministic_by_seed():
    a = load_suite(n_train=60, n_id_test=30, n_ood_test=30, seed=3)
    b = load_suite(n_train=60, n_id_test=30, n_ood_test=30, seed=3)
    c = load_suite(n_train=60, n_id_test=30, n_ood_test=30, seed=4)
    assert a.train == b.train and a.ood_test == b.ood_test
    assert a.train != c.train
    assert pretrain_corpus(seed=1, n=200) == pretrain_corpus(seed=1, n=200)


def test_translate_labels_match_biopython(full_suite):
    seen_codes = set()
    for ex in full_suite.train + full_suite.id_test + full_suite.ood_test:
        if ex.task != "translate":
            continue
        code = int(_rule(ex)[2:])
        seen_codes.add((ex.split, code))
        assert ex.answer == str(Seq(_seq(ex).upper()).translate(table=code))
        if ex.split == "ood_test":  # the named rule matters in every OOD prompt
            assert ex.answer != translate(_seq(ex).upper(), 1)
    assert {c for s, c in seen_codes if s != "ood_test"} == {1, 11}
    assert {c for s, c in seen_codes if s == "ood_test"} == {2, 4}


def test_strand_labels_match_biopython(full_suite):
    for ex in full_suite.train + full_suite.ood_test:
        if ex.task == "strand":
            seq, op = Seq(_seq(ex).upper()), _rule(ex)
            # base by base: the complement strand, mRNA from the coding strand, mRNA from the
            # template strand written 3'->5'
            expected = {"cm": seq.complement(), "tx": seq.transcribe(),
                        "rt": seq.complement().transcribe()}[op]
            assert ex.answer == str(expected)
            assert (op == "rt") == (ex.split == "ood_test")


def test_charge_labels(full_suite):
    for ex in full_suite.train + full_suite.ood_test:
        if ex.task != "charge":
            continue
        ph, pep = float(_rule(ex)[2:]), _seq(ex)
        assert len(ex.answer) == len(pep)
        for residue, sign in zip(pep, ex.answer, strict=True):
            if residue in "KR" or (residue == "H" and ph < 5.98):
                want = "+" if not (residue == "K" and ph > 10) else "0"
            elif residue in "DE" or (residue == "C" and ph > 9) or (residue == "Y" and ph > 10):
                want = "-"
            else:
                want = "0"
            assert sign == want, (ex, residue)
        assert (ph in (5.0, 11.0)) == (ex.split == "ood_test")


def test_other_labels(full_suite):
    for ex in full_suite.train + full_suite.id_test + full_suite.ood_test:
        seq = _seq(ex)
        if ex.task == "gc_count":
            assert int(ex.answer) == seq.count("G") + seq.count("C")
        elif ex.task == "antisense":
            assert ex.answer == str(Seq(seq).reverse_complement_rna())
        elif ex.task == "restriction":
            enzyme = next(e for e in Restriction.AllEnzymes if e.__name__.lower() == _rule(ex)[2:])
            assert int(ex.answer) == seq.find(str(enzyme.site)) + 1
        elif ex.task == "stop":
            protein = str(Seq(seq[: len(seq) // 3 * 3]).translate(table=int(_rule(ex)[2:])))
            assert int(ex.answer) == (protein.index("*") + 1 if "*" in protein else 0)


def test_render_examples():
    shown = render_examples("translate", n=2)
    assert [e.split for e in shown] == ["id_test", "id_test", "ood_test", "ood_test"]


def test_unknown_names_rejected():
    with pytest.raises(TaskFileError, match=r"allowed: .*translate"):
        load_suite(names=["nope"])
    with pytest.raises(TaskFileError, match="allowed: exact, per_position, set_f1, numeric"):
        load_suite(scorer="fuzzy")


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [{"prompt": "a:1=", "answer": "x", "split": "train"},
        {"prompt": "a:2=", "answer": "y", "split": "id_test", "task": "t"},
        {"prompt": "a:3=", "answer": "4.0", "split": "ood_test", "task": "t"}]


def test_jsonl_loads_relative_to_base_dir(tmp_path):
    _write(tmp_path / "t.jsonl", GOOD)
    suite = load_suite("t.jsonl", base_dir=tmp_path, scorer="numeric")
    assert [len(suite.train), len(suite.id_test), len(suite.ood_test)] == [1, 1, 1]
    assert suite.tasks["t"].scorer == "numeric" and suite.tasks["user"].domain == "user"
    assert suite.score(suite.ood_test[0], "4") == 1.0


@pytest.mark.parametrize("bad, why", [
    ("{not json", "invalid JSON"),
    ({"prompt": "p", "split": "train"}, "missing field 'answer'"),
    ({"prompt": "p", "answer": "a", "split": "dev"}, "unknown split 'dev'"),
    ({"prompt": "p", "answer": "", "split": "train"}, "field .answer. must be a non-empty"),
])
def test_jsonl_bad_row_names_line(tmp_path, bad, why):
    path = _write(tmp_path / "bad.jsonl", [*GOOD[:2], bad, GOOD[2]])
    with pytest.raises(TaskFileError, match=f"line 3: {why}") as err:
        load_suite(str(path))
    assert str(path) in str(err.value) and "id_test" in str(err.value)


def test_jsonl_empty_test_split_rejected(tmp_path):
    path = _write(tmp_path / "t.jsonl", GOOD[:2])
    with pytest.raises(TaskFileError, match="'ood_test' split is empty"):
        load_suite(str(path))


def test_scorers():
    assert SCORERS["exact"]("MW\n", "MW") == 1.0 and SCORERS["exact"]("M", "MW") == 0.0
    assert SCORERS["per_position"]("MWK", "MWR") == pytest.approx(2 / 3)
    assert SCORERS["set_f1"]("3,7", "7,3") == 1.0 and SCORERS["set_f1"]("-", "-") == 1.0
    assert SCORERS["set_f1"]("3", "3,7") == pytest.approx(2 / 3)
    assert SCORERS["numeric"]("3.2", "3") == 1.0 and SCORERS["numeric"]("4", "3") == 0.75
    assert SCORERS["numeric"]("abc", "3") == 0.0 and SCORERS["numeric"]("9", "3") == 0.0


def test_reward_has_format_term(full_suite):
    ex = next(e for e in full_suite.train if e.task == "translate")
    assert full_suite.reward(ex, ex.answer) == pytest.approx(1.1)
    wrong = "A" if ex.answer[0] != "A" else "G"
    assert full_suite.reward(ex, wrong) == pytest.approx(0.1)
    assert full_suite.reward(ex, "hello there") == 0.0


def test_pretrain_corpus_balances_variants():
    """Every rule variant of a default task is drawn as often as its weight says, although OOD
    draws are rejected more often (a prompt must hold a codon or residue whose meaning differs)."""
    from collections import Counter

    from stagebudget.tasks.corpus import OOD_WEIGHT

    counts = Counter(t.split(":", 1)[0] for t in pretrain_corpus(seed=0, n=6000) if ":" in t)
    for id_rule, ood_rule in (("tl1", "tl2"), ("tl11", "tl4"), ("ch7", "ch5"), ("ch8", "ch11")):
        assert counts[ood_rule] / counts[id_rule] == pytest.approx(OOD_WEIGHT, rel=0.3)


def test_pretrain_corpus_has_all_variants():
    texts = pretrain_corpus(seed=0, n=3000)
    prefixes = {t.split(":", 1)[0] for t in texts if ":" in t}
    assert {"tl1", "tl11", "tl2", "tl4", "cm", "tx", "rt", "ch5", "ch7", "ch11"} <= prefixes
    assert any(":" not in t for t in texts)  # raw sequence chunks
    assert max(map(len, texts)) <= 64


def test_the_raw_corpus_holds_sequences_and_no_task():
    """``corpus="raw"`` (a cpt stage's option): DNA and protein chunks only, no task prompt, no
    rule; the same texts for the same seed."""
    texts = pretrain_corpus(seed=0, n=400, corpus="raw")
    assert len(texts) == 400 and texts == pretrain_corpus(seed=0, n=400, corpus="raw")
    assert texts != pretrain_corpus(seed=1, n=400, corpus="raw")
    assert not any(":" in t or "=" in t for t in texts)
    assert set("".join(texts)) <= set("ACDEFGHIKLMNPQRSTVWYBXZUO*")
    assert all(16 <= len(t) <= 30 for t in texts)
    with pytest.raises(ValueError, match="the corpora are mixture, raw"):
        pretrain_corpus(n=5, corpus="tasks")


# ---------------------------------------------------------------- chat prompts, scorers as code
def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "Answer in tags."}, {"role": "user", "content": text}]


CHAT_ROWS = [
    {"prompt": _chat("rc AAC"), "answer": "GTT", "completion": "<answer>GTT</answer>",
     "split": "train"},
    {"prompt": _chat("rc AGC"), "answer": "GCT", "split": "train"},
    {"prompt": _chat("rc TTA"), "answer": "TAA", "split": "id_test"},
    {"prompt": _chat("rc CCAG"), "answer": "CTGG", "split": "ood_test"},
]


def test_chat_prompts_load_with_completion_and_file_sizes(tmp_path):
    suite = load_suite(str(_write_rows(tmp_path / "t.jsonl", CHAT_ROWS)))
    assert suite.conversational and suite.train[0].prompt == CHAT_ROWS[0]["prompt"]
    assert suite.train[0].target == "<answer>GTT</answer>" and suite.train[1].target == "GCT"
    assert suite.sizes() == {"n_train": 2, "n_id_test": 1, "n_ood_test": 1}
    assert suite.warnings == []


@pytest.mark.parametrize(("prompt", "why"), [
    ([], "empty list of messages"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user"}], "exactly the keys 'role' and 'content'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
     "last prompt message is the assistant's"),
])
def test_bad_chat_prompts_name_the_line(tmp_path, prompt, why):
    rows = [*CHAT_ROWS[:2], {**CHAT_ROWS[2], "prompt": prompt}, CHAT_ROWS[3]]
    with pytest.raises(TaskFileError, match="line 3") as err:
        load_suite(str(_write_rows(tmp_path / "t.jsonl", rows)))
    assert why in str(err.value)


def test_text_and_chat_prompts_cannot_mix(tmp_path):
    rows = [*CHAT_ROWS[:3], {"prompt": "rc CCAG", "answer": "CTGG", "split": "ood_test"}]
    with pytest.raises(TaskFileError, match="line 4 has a text prompt and line 1 a list"):
        load_suite(str(_write_rows(tmp_path / "t.jsonl", rows)))


def test_test_prompts_that_sit_in_train_are_flagged_once_per_split(tmp_path):
    rows = [*CHAT_ROWS, {**CHAT_ROWS[1], "split": "ood_test"}]
    suite = load_suite(str(_write_rows(tmp_path / "t.jsonl", rows)))
    assert len(suite.warnings) == 1
    assert "1 of 2 ood_test prompts also appear in train (e.g. line 5 repeats line 2)" in \
        suite.warnings[0]


def test_file_sizes_in_a_schedule_must_match_the_file(tmp_path):
    path = _write_rows(tmp_path / "t.jsonl", CHAT_ROWS)
    load_suite(str(path), n_train=2, n_id_test=1, n_ood_test=1)
    with pytest.raises(TaskFileError, match=r"n_train=4000, .*holds n_train=2"):
        load_suite(str(path), n_train=4000)


def test_answer_extraction_then_scorer_is_the_score_and_the_reward(tmp_path):
    path = _write_rows(tmp_path / "t.jsonl", CHAT_ROWS)
    suite = load_suite(str(path), scorer="stagebudget.tasks.scoring:per_position",
                       answer="answer_tag", format_reward=0.2)
    ex = suite.id_test[0]  # answer TAA
    assert suite.score(ex, "<think>hmm</think><answer>TAA</answer>") == 1.0
    assert suite.score(ex, "<answer>TAC</answer>") == pytest.approx(2 / 3)
    assert suite.score(ex, "TAA") == 0.0  # no tags: nothing to score
    assert suite.reward(ex, "<answer>TAC</answer>") == pytest.approx(2 / 3 + 0.2)
    assert suite.reward(ex, "TAA") == 0.0
    last = load_suite(str(path), answer="last_line")
    assert last.score(ex, "let me think\nTAA") == 1.0
    rx = load_suite(str(path), answer=r"regex:is (\w+)")
    assert rx.score(ex, "it is TAC, no, it is TAA.") == 1.0


@pytest.mark.parametrize(("scorer", "answer", "needle"), [
    ("nope", None, "unknown scorer 'nope'"),
    ("no_such_module_xyz:f", None, "cannot import 'no_such_module_xyz'"),
    ("stagebudget.tasks.scoring:missing", None, "has no function 'missing'"),
    ("missing.py:f", None, "no file"),
    ("exact", "first_word", "unknown answer extraction 'first_word'"),
    ("exact", "regex:(", "invalid regular expression"),
])
def test_bad_scorers_and_extractions_name_the_task_file(tmp_path, scorer, answer, needle):
    path = _write_rows(tmp_path / "t.jsonl", CHAT_ROWS)
    with pytest.raises(TaskFileError) as err:
        load_suite(str(path), scorer=scorer, answer=answer, base_dir=tmp_path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_a_scorer_that_raises_fails_at_load_not_mid_training(tmp_path):
    (tmp_path / "s.py").write_text("def f(prediction, answer):\n    raise KeyError('oops')\n")
    with pytest.raises(TaskFileError, match="raised KeyError: 'oops'"):
        load_suite(str(_write_rows(tmp_path / "t.jsonl", CHAT_ROWS)), scorer="s.py:f",
                   base_dir=tmp_path)


def test_the_grpo_reward_scores_chat_completions_with_the_task_scorer(tmp_path):
    from stagebudget.training.stages.rl import suite_reward

    suite = load_suite(str(_write_rows(tmp_path / "t.jsonl", CHAT_ROWS)),
                       scorer="per_position", answer="answer_tag")
    reward = suite_reward(suite)
    ex = suite.id_test[0]  # answer TAA
    got = reward(prompts=[ex.prompt] * 3, answer=[ex.answer] * 3, task=[ex.task] * 3,
                 completions=[[{"role": "assistant", "content": "<answer>TAA</answer>"}],
                              [{"role": "assistant", "content": "<answer>TAC</answer>"}],
                              [{"role": "assistant", "content": "TAA"}]])
    assert got == pytest.approx([1.1, 2 / 3 + 0.1, 0.0])


def test_the_grpo_reward_gives_partial_credit_to_exact_match_tasks():
    from stagebudget.training.stages.rl import PARTIAL_CREDIT, suite_reward

    suite = load_suite(names=["translate"], n_train=5, n_id_test=5, n_ood_test=5)
    ex = next(e for e in suite.train if len(e.answer) >= 2)
    seen = set("".join(e.answer for e in suite.train + suite.id_test + suite.ood_test))
    near = min(seen - {ex.answer[0]}) + ex.answer[1:]  # one residue wrong, still well formed
    reward = suite_reward(suite)
    got = reward(prompts=[ex.prompt] * 3, answer=[ex.answer] * 3, task=[ex.task] * 3,
                 completions=[ex.answer, near, ""])
    credit = (len(ex.answer) - 1) / len(ex.answer)
    assert got == pytest.approx([1.1 + PARTIAL_CREDIT, PARTIAL_CREDIT * credit + 0.1, 0.0])
    scores = [row[2] for row in reward.calls[0]]  # the task-score part, kept apart
    assert [sum(scores) / len(scores)] == [pytest.approx(1 / 3)]
    assert [row[0] for row in reward.calls[0]] == [(ex.task, len(ex.answer))] * 3
    plain = suite_reward(suite, partial=0.0)
    assert plain(prompts=[ex.prompt], answer=[ex.answer], task=[ex.task],
                 completions=[near]) == [pytest.approx(0.1)]

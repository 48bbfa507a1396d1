"""Reliability: what survives out-of-memory trials, full or read-only disks, corrupted records,
caches and run files, hostile input files, and bad schedules. No Ray cluster is started; the only
training is the test-sized base model (built once, then corrupted and rebuilt).
"""

from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from fake_run import FRONT, make_fake_run
from stagebudget import cli
from stagebudget.errors import ConfigError, RunError, UserError
from stagebudget.fileio import atomic_write_json
from stagebudget.results.run import load_run
from stagebudget.rundir import RunDir, TrialRecord

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "stagebudget"
DEMO = ROOT / "search_spaces" / "demo.yaml"
PARAMS = {"sft.share": 0.5, "sft.lora_rank": 8, "rl.lora_rank": 16}


def cli_run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stagebudget.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- 1. out of memory
class _Context:
    def get_trial_id(self) -> str:
        return "oom_00001"


@pytest.mark.parametrize("make_error", [
    lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: MemoryError("cannot allocate 8 GiB"),
])
def test_out_of_memory_trial_is_failed_with_its_message_never_scored(tmp_path, monkeypatch,
                                                                      make_error):
    from ray import tune

    from stagebudget.searching.trainable import trial_trainable
    from stagebudget.space.schema import SearchSpace

    reports: list[dict] = []
    monkeypatch.setattr(tune, "get_context", lambda: _Context())
    monkeypatch.setattr(tune, "report", reports.append)
    error = make_error()

    def oom(schedule, out_dir=None, *, report=None, **_):
        report({"stage": "sft", "step": 10, "id_accuracy": 0.4, "ood_accuracy": 0.3})
        raise error

    space = SearchSpace.load(DEMO)
    with pytest.raises(type(error)):  # re-raised: Tune retries it, Optuna records FAIL
        trial_trainable(dict(PARAMS), space=space, run_dir=str(tmp_path), trial_fn=oom,
                        cost=space.cost_model(), device="cpu")
    [record] = RunDir(tmp_path).records()
    assert record.status == "FAILED" and record.finished is not None
    assert record.error.startswith(f"{type(error).__name__}: {error}")
    assert "out of memory" in record.error and "batch_size" in record.error  # the hint
    assert record.objectives == {}                     # never a 0 score
    assert not any(r.get("final") for r in reports)    # no final result reported to Tune


def test_failure_is_recorded_even_when_the_record_cannot_be_saved(tmp_path, monkeypatch):
    """A full disk while recording a failure must not hide the trial's own error."""
    from stagebudget.searching import trainable

    run = RunDir(tmp_path)
    record = TrialRecord(key="t1", params=dict(PARAMS), schedule={})
    run.write_record(record)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    trainable.record_failure(run, record, MemoryError("oom"))  # does not raise a UserError
    assert record.status == "FAILED" and record.error.startswith("MemoryError: oom")


# ---------------------------------------------------------------- 2. full / read-only disk
def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("where,code", [("os.replace", errno.ENOSPC), ("mkstemp", errno.EROFS),
                                        ("fsync", errno.ENOSPC)])
def test_atomic_write_on_full_or_read_only_disk(tmp_path, monkeypatch, where, code):
    target = tmp_path / "record.json"
    atomic_write_json(target, {"status": "COMPLETE", "objectives": {"id_accuracy": 0.8}})
    before = target.read_bytes()

    def refuse(*_a, **_k):
        raise OSError(code, os.strerror(code))

    if where == "os.replace":
        monkeypatch.setattr(os, "replace", refuse)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", refuse)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    if code == errno.ENOSPC:  # a full disk stays an OSError (retryable; the CLI words it)
        with pytest.raises(OSError, match=os.strerror(code)) as err:
            atomic_write_json(target, {"status": "FAILED"})
        assert err.value.errno == code and err.value.filename == str(target)
    else:
        with pytest.raises(UserError, match=rf"cannot write {target}: {os.strerror(code)}"):
            atomic_write_json(target, {"status": "FAILED"})
    assert target.read_bytes() == before       # the previous record is untouched
    assert leftovers(tmp_path) == []            # and no temp file is left behind


def test_atomic_write_into_a_read_only_directory(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    atomic_write_json(folder / "a.json", {"x": 1})
    before = (folder / "a.json").read_bytes()
    folder.chmod(0o500)
    try:
        if _is_root():
            pytest.skip("root ignores directory permissions; covered by the monkeypatched test")
        with pytest.raises(UserError, match=rf"cannot write {folder / 'a.json'}"):
            atomic_write_json(folder / "a.json", {"x": 2})
    finally:
        folder.chmod(0o700)
    assert (folder / "a.json").read_bytes() == before and leftovers(folder) == []


def test_cli_export_to_an_unwritable_path_exits_2(tmp_path):
    run = make_fake_run(tmp_path / "run")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    res = cli_run("export", str(run), "-o", str(blocker / "best.yaml"))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "best.yaml" in res.stderr and "is not a directory" in res.stderr
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_cli_export_on_full_or_read_only_disk_exits_2(tmp_path, monkeypatch, capsys, code):
    run = make_fake_run(tmp_path / "run")
    out = tmp_path / "best.yaml"
    out.write_text("old: true\n")

    def refuse(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(run), "-o", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and os.strerror(code) in err and "Traceback" not in err
    assert out.read_text() == "old: true\n" and leftovers(tmp_path) == []


def test_cli_turns_a_refused_file_operation_into_one_paragraph(tmp_path, monkeypatch, capsys):
    import stagebudget.results.status

    run = make_fake_run(tmp_path / "run")

    def refuse(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/runs/x/report.html")

    monkeypatch.setattr(stagebudget.results.status, "render_status", refuse)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["status", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "/srv/runs/x/report.html" in err and "Permission denied" in err


# ---------------------------------------------------------------- 3. corrupted records and curves
def test_corrupted_records_are_skipped_reported_and_status_still_works(tmp_path):
    root = make_fake_run(tmp_path / "run")
    run = RunDir(root)
    truncated = run.trial_dir("fake_00003") / "record.json"
    truncated.write_bytes(truncated.read_bytes()[:40])      # killed mid-write by a foreign tool
    wrong_shape = run.trial_dir("fake_00005") / "record.json"
    wrong_shape.write_text("[1, 2, 3]\n")                   # valid JSON, not a record
    keys = {r.key for r in run.records()}
    assert len(keys) == 9 and "fake_00003" not in keys and "fake_00005" not in keys
    assert run.bad_records() == [truncated, wrong_shape]
    assert load_run(root).front(curves=False).front  # the study still gives the front

    res = cli_run("status", str(root))
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert f"warning: corrupted trial record {truncated}" in out
    assert f"warning: corrupted trial record {wrong_shape}" in out


def test_torn_curve_lines_are_ignored(tmp_path):
    root = make_fake_run(tmp_path / "run")
    run = RunDir(root)
    path = run.trial_dir("fake_00004") / "curves.jsonl"
    good = run.curves("fake_00004")
    with path.open("ab") as fh:
        fh.write(b'{"stage": "rl", "step": 4')     # torn last line
    assert run.curves("fake_00004") == good
    path.write_bytes(path.read_bytes() + b"\n12\n\xe2\x82")  # parses as a number; torn UTF-8
    assert run.curves("fake_00004") == good
    assert load_run(root).front().front == FRONT   # curves of the front still load


# ---------------------------------------------------------------- 4. corrupted cached base model
def test_corrupted_cached_base_model_is_detected_and_rebuilt(tmp_path):
    from stagebudget.modelref import ModelRefError, cache_problem, resolve_base_model
    from stagebudget.training.model import build_base, load_model_and_tokenizer

    path = build_base("test", cache_dir=tmp_path)
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    assert cache_problem(path) is None
    assert json.loads((path / "base_info.json").read_text())["files"] == {weights.name: size}

    tokenizer = path / "tokenizer.json"
    tok = tokenizer.read_bytes()
    tokenizer.write_bytes(tok[:-10])                         # a broken tokenizer.json
    assert "tokenizer.json does not match the checksum" in cache_problem(path)
    tokenizer.write_bytes(tok)
    good = weights.read_bytes()
    weights.write_bytes(b"\0" * size)                         # same size, garbage header
    assert "not a valid safetensors file" in cache_problem(path)
    weights.write_bytes(good[: size // 2])                   # truncated (header intact)
    assert "bytes" in cache_problem(path)
    header = 8 + int.from_bytes(good[:8], "little")          # zeroed weights, header and size
    weights.write_bytes(good[:header] + b"\0" * (size - header))  # intact: only content differs
    assert "checksum" in cache_problem(path)
    with pytest.raises(ModelRefError, match="does not match the checksum"):  # never handed out
        resolve_base_model(str(path))

    messages: list[str] = []
    again = build_base("test", cache_dir=tmp_path, progress=messages.append)
    assert again == path and any("damaged" in m and "rebuilding" in m for m in messages)
    assert weights.stat().st_size == size and cache_problem(path) is None
    model, _tok = load_model_and_tokenizer(path)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp build left


# ---------------------------------------------------------------- 5. corrupted run.json / study.db
def test_corrupted_run_json_is_a_run_error(tmp_path):
    root = make_fake_run(tmp_path / "run")
    meta = (root / "run.json").read_bytes()
    (root / "run.json").write_bytes(meta[: len(meta) // 2])
    with pytest.raises(RunError, match=r"run\.json: unreadable or corrupted JSON"):
        load_run(root)
    res = cli_run("status", str(root))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "run.json" in res.stderr


@pytest.mark.parametrize("content,needle", [(b"this is not a database\n" * 20,
                                             "is not an SQLite database"),
                                            (b"", "is empty")])
def test_study_db_that_is_not_a_database_is_a_run_error(tmp_path, content, needle):
    root = make_fake_run(tmp_path / "run")
    (root / "study.db").write_bytes(content)
    with pytest.raises(RunError, match=needle) as info:
        load_run(root)
    assert "study.db" in str(info.value)
    assert (root / "study.db").read_bytes() == content     # nothing written into it


# ---------------------------------------------------------------- 6. safety
def test_yaml_python_tags_are_rejected_and_never_executed(tmp_path):
    from stagebudget.schedule import Schedule
    from stagebudget.space.schema import SearchSpace

    marker = tmp_path / "pwned"
    hostile = f'!!python/object/apply:os.system ["touch {marker}"]\n'
    space = tmp_path / "space.yaml"
    space.write_text(f"name: x\nbase_model: {hostile}")
    with pytest.raises(ConfigError, match=r"space\.yaml"):
        SearchSpace.load(space)
    sched = tmp_path / "sched.yaml"
    sched.write_text(f"stages:\n  - {hostile}")
    with pytest.raises(ConfigError, match=r"sched\.yaml"):
        Schedule.load(sched)
    assert not marker.exists()


def _calls(name: str) -> list[tuple[Path, ast.Call, list[str]]]:
    """Every call of attribute ``name`` in src, with the names of its enclosing functions."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def walk(node: ast.AST, scopes: list[ast.AST], path: Path = path) -> None:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == name:
                found.append((path, node, scopes))
            inner = [*scopes, node] if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                else scopes
            for child in ast.iter_child_nodes(node):
                walk(child, inner)

        walk(tree, [])
    return found


def _default_false(func: ast.AST, param: str) -> bool:
    args = func.args  # type: ignore[attr-defined]
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d]
    return any(a.arg == param and isinstance(d, ast.Constant) and d.value is False
               for a, d in pairs)


def test_from_pretrained_never_trusts_remote_code_by_default_and_loads_safetensors():
    calls = _calls("from_pretrained")
    assert calls, "expected from_pretrained calls in src"
    for path, call, scopes in calls:
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        kw = {k.arg: k.value for k in call.keywords}
        assert "trust_remote_code" in kw, f"{where}: pass trust_remote_code= explicitly"
        value = kw["trust_remote_code"]
        if isinstance(value, ast.Constant):
            assert value.value is False, f"{where}: trust_remote_code must not be True"
        else:  # a parameter of an enclosing function that defaults to False
            assert isinstance(value, ast.Name) and any(_default_false(f, value.id) for f in scopes), \
                f"{where}: trust_remote_code must come from a parameter defaulting to False"
        receiver = ast.unparse(call.func.value)
        if "Tokenizer" not in receiver:  # model weights: safetensors only, never pickle
            use = kw.get("use_safetensors")
            assert isinstance(use, ast.Constant) and use.value is True, \
                f"{where}: {receiver}.from_pretrained needs use_safetensors=True"


def test_no_shell_true_and_no_unsafe_loaders_in_src():
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for k in node.keywords:
                assert not (k.arg == "shell" and not (isinstance(k.value, ast.Constant)
                                                      and k.value.value is False)), \
                    f"{where}: shell=True"
            func = ast.unparse(node.func)
            assert func not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load",
                                "pickle.load", "pickle.loads", "eval", "exec", "os.system"), \
                f"{where}: {func} is not allowed"
            if func == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) \
                    and kw["weights_only"].value is True, f"{where}: torch.load needs weights_only"


# ---------------------------------------------------------------- 7. train on an invalid schedule
@pytest.mark.parametrize("change,needles", [
    ({"steps": -3}, ["field `stages.0.steps`", "greater than or equal to 1", "-3"]),
    ({"dropout": 0.1}, ["unknown key `dropout`"]),
])
def test_train_on_an_edited_invalid_schedule_exits_2_and_writes_nothing(tmp_path, change, needles):
    path = tmp_path / "best.yaml"
    schedule = {"base_model": "builtin:test", "budget_hours": 0.001,
                "stages": [{"kind": "sft", "steps": 4, "lora_rank": 4, **change}]}
    path.write_text(yaml.safe_dump({"schedule": schedule}))
    out = tmp_path / "trained"
    res = cli_run("train", str(path), "-o", str(out), "--device", "cpu")
    assert res.returncode == 2, res.stdout + res.stderr
    err = " ".join(res.stderr.split())
    assert "Traceback" not in err and str(path) in err
    for needle in needles:
        assert needle in err
    assert not out.exists()

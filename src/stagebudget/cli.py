"""The ``stagebudget`` command line.

Every command imports its heavy machinery lazily, so ``--help``, ``validate``, ``tasks``,
``status`` and ``pareto`` answer quickly. User mistakes (:class:`~stagebudget.errors.UserError`)
print one paragraph and exit with status 2, without a traceback.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from stagebudget.errors import UserError

if TYPE_CHECKING:
    from stagebudget.schedule import TasksRef

app = typer.Typer(
    name="stagebudget",
    help="Decide how to spend a fixed post-training budget: search SFT/RL/LoRA schedules for the "
    "in-domain / out-of-domain Pareto front.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
base_app = typer.Typer(help="Build or inspect the embedded base model.", no_args_is_help=True)
app.add_typer(base_app, name="base")
cache_app = typer.Typer(help="Inspect or prune the stage-prefix checkpoint cache.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")
CacheDir = Annotated[Path | None, typer.Option(
    "--dir", help="Prefix cache directory (default: $STAGEBUDGET_CACHE/prefixes)")]
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


@app.command()
def search(
    space: Annotated[Path, typer.Argument(help="Search-space YAML file, e.g. search_spaces/demo.yaml")],
    name: Annotated[str | None, typer.Option(help="Run name (default: the space's name)")] = None,
    trials: Annotated[int | None, typer.Option(help="Number of trials (overrides the space)")] = None,
    search_hours: Annotated[float | None, typer.Option(
        "--search-hours", "--budget-hours",
        help="Device-hour budget for the whole search (overrides budget.search_hours); no trial "
             "starts past it. --budget-hours is its earlier name")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Trials at once (overrides the space)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray)")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL (default: SQLite in the run directory)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted search")] = False,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories go")] = Path("runs"),
    live: Annotated[bool, typer.Option(help="Live display (off: plain log lines)")] = True,
    mlflow: Annotated[str | None, typer.Option(
        help="Also log every trial to this MLflow tracking URI (needs mlflow)")] = None,
) -> None:
    """Run a budgeted multi-objective search (Optuna samples, Ray Tune runs the trials)."""
    from stagebudget.errors import SearchInterrupted
    from stagebudget.searching.driver import run_search

    try:
        run_dir = run_search(
            space, name=name, runs_dir=runs_dir, trials=trials, search_hours=search_hours,
            concurrency=concurrency, address=address, storage=storage, resume=resume, live=live,
            mlflow=mlflow,
        )
    except SearchInterrupted as exc:  # typer turns a KeyboardInterrupt into a silent exit 130
        err_console.print(str(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    from stagebudget.rundir import RunDir, SearchOutcome

    outcome = SearchOutcome.of(RunDir(run_dir).records())
    console.print(f"run directory: {run_dir}")
    if outcome.complete:
        console.print(f"next: stagebudget pareto {run_dir}   |   "
                      f"stagebudget export {run_dir} --pick knee")
    # The last line says how the trials ended; the exit status says it too (rundir's *_EXIT).
    console.print(outcome.line(), highlight=False, soft_wrap=True)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


@app.command()
def validate(
    space: Annotated[Path, typer.Argument(help="Search-space YAML file")],
) -> None:
    """Check a search space (every check `search` runs before it starts) and print it with its
    cheapest and most expensive schedules."""
    from stagebudget.searching.preflight import check_space

    warnings: list[str] = []
    s = check_space(space, warn=warnings.append)
    cost = s.cost_model()
    cheap, dear = s.check_feasible(cost)
    console.print(f"[bold]{space}[/bold]: search space {s.name!r} is valid")
    console.print(f"  base model: {s.base_model}", highlight=False)
    console.print(f"  tasks: {_describe_tasks(s.tasks)}", highlight=False, soft_wrap=True)
    console.print(f"  per-trial budget: {s.budget.per_trial_hours:g} device-hours "
                  f"({s.per_trial_budget.seconds:.0f} s); search budget: "
                  f"{s.budget.search_hours if s.budget.search_hours else 'none'}")
    console.print(f"  allocation by {s.mode}; searched dimensions:")
    for pname, dist in s.dimensions().items():
        spec = dist.model_dump(exclude_none=True, exclude_defaults=True)
        console.print(f"    {pname}: {spec}")
    objectives = ", ".join(f"{o.name} ({o.direction})" for o in s.objectives)
    console.print(f"  objectives: {objectives}")
    console.print(f"  sampler: {s.sampler.name}   trials: {s.trials}   concurrency: {s.concurrency}")
    console.print(f"  cost model: {cost.source}")
    for label, sched in (("cheapest", cheap), ("most expensive", dear)):
        console.print(f"  {label} schedule: {sched.describe()}  "
                      f"{cost.schedule_seconds(sched):.1f} device-seconds planned")
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)


def _describe_tasks(tasks: TasksRef) -> str:
    """One line: the task source (built-in names or the file path), sizes and scoring."""
    if tasks.source == "builtin":
        where = f"built-in {', '.join(tasks.names) if tasks.names else '(default set)'}"
    else:
        where = f"file {tasks.source}"
    sizes = f"train {tasks.n_train}, id_test {tasks.n_id_test}, ood_test {tasks.n_ood_test}"
    scoring = f"scorer {tasks.scorer or 'exact'}, answer {tasks.answer or 'full'}"
    return f"{where} ({sizes}); {scoring}"


@app.command()
def status(
    run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/demo")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON: the trials (label, schedule, state, objectives ± SE, nominal "
        "and spent cost) and the front; warnings go to stderr")] = False,
) -> None:
    """Table of trials and the current Pareto front (works mid-run)."""
    from stagebudget.results.run import load_run
    from stagebudget.results.status import render_status, status_document

    loaded = load_run(run)
    if as_json:
        sys.stdout.write(json.dumps(status_document(loaded), indent=2, allow_nan=False) + "\n")
    else:
        render_status(loaded, console)
    for path in loaded.dir.bad_records():  # beside the JSON, never inside stdout's document
        (err_console if as_json else console).print(
            f"[yellow]warning:[/yellow] corrupted trial record {path} (skipped; its trial shows "
            "without schedule or curves)", highlight=False, soft_wrap=True)


@app.command()
def pareto(
    run: Annotated[Path, typer.Argument(help="Run directory")],
    out: Annotated[Path | None, typer.Option(
        "-o", "--out", help="HTML file (default RUN/report.html)")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the report in a browser")] = False,
    png: Annotated[bool, typer.Option(help="Also write PNGs (needs a browser engine)")] = False,
) -> None:
    """Write the self-contained HTML Pareto report of a run."""
    from stagebudget.results.report import write_report
    from stagebudget.results.run import load_run

    path = write_report(load_run(run), out, png=png)
    console.print(f"report: {path}")
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory")],
    pick: Annotated[str, typer.Option(
        help="knee | max-ood | max-id | ood-at-id=0.9 | trial=N")] = "knee",
    out: Annotated[Path, typer.Option("-o", "--out", help="Schedule file to write")] = Path("best.yaml"),
    max_budget: Annotated[str | None, typer.Option(
        help="Pick among the trials' evaluated checkpoints that fit this budget: a fraction of "
        "the per-trial budget (0.5, 1/4, 50%) or device-hours (0.006h); the export is the cut "
        "schedule")] = None,
) -> None:
    """Export a front schedule: a file `stagebudget train` re-runs, its TRL/PEFT configs, and a
    stand-alone TRL + PEFT script beside it (same name, .py)."""
    from stagebudget.results.export import export as do_export
    from stagebudget.results.export import script_path
    from stagebudget.results.run import load_run

    path = do_export(load_run(run), pick, out, max_budget=max_budget)
    console.print(f"exported: {path}   re-run with: stagebudget train {path} -o OUTDIR")
    console.print(f"plain TRL + PEFT: python {script_path(path)} --out OUTDIR")


@app.command()
def train(
    schedule: Annotated[Path, typer.Argument(help="Schedule YAML (e.g. from `stagebudget export`)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory")] = Path("trained"),
    save: Annotated[bool, typer.Option(help="Save the final model (safetensors)")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[int | None, typer.Option(
        min=1, help="torch threads (default: the export's torch_threads, as its trial trained; "
        "else torch's default)")] = None,
) -> None:
    """Train one schedule end to end and measure ID/OOD at every evaluation point."""
    from stagebudget.results.export import exported_threads
    from stagebudget.schedule import Schedule
    from stagebudget.space.inputs import check_inputs, generated_tokens
    from stagebudget.space.schema import DEVICE
    from stagebudget.training.progress import train_with_progress
    from stagebudget.training.vllmcheck import check_vllm

    if not DEVICE.fullmatch(device):
        raise UserError(f"--device {device!r} is not a device; allowed: auto, cpu, cuda, "
                        "cuda:N, mps")
    sched = Schedule.load(schedule)
    threads = threads if threads is not None else exported_threads(schedule)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file; give a directory for the trained model and its "
                        "curves (it is created if missing)")
    # Everything is checked before the output directory is made: bad input writes nothing.
    # (its warnings are logged again when training loads the model: not printed twice here)
    check_inputs(sched.base_model, sched.tasks, schedule, base_dir=schedule.resolve().parent,
                 trust_remote_code=sched.trust_remote_code,
                 generation=generated_tokens((s.kind, s) for s in sched.stages))
    check_vllm(((s.kind, s) for s in sched.stages), schedule)
    result = train_with_progress(sched, out, save_model=save, device=device, console=console,
                                 base_dir=schedule.resolve().parent, threads=threads)
    console.print(f"ID {result.id_accuracy:.3f}  OOD {result.ood_accuracy:.3f}  "
                  f"device-hours {result.device_hours:.5f}  ->  {out}")


@app.command()
def calibrate(
    base_model: Annotated[str, typer.Option(help="builtin:tiny or a local model directory")] = "builtin:tiny",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Table file (default: cache)")] = None,
    tasks: Annotated[Path | None, typer.Option(
        help="A JSONL task file: time steps on its prompts (default: the built-in suite)")] = None,
    space: Annotated[Path | None, typer.Option(
        help="Calibrate for a search space: its model, tasks, device and stage shapes, with "
             "its concurrency (saved to -o, else its cost_table, else the default table)")] = None,
) -> None:
    """Time a few real steps of each stage kind and save the cost table the planner uses."""
    from stagebudget.training.calibrate import calibrate as do_calibrate
    from stagebudget.training.calibrate import calibrate_space

    if space is not None:
        cost = calibrate_space(space, out=out, progress=console.print)
        console.print(f"saved: {cost.source}")
        return
    cost = do_calibrate(base_model=base_model, device=device, out=out,
                        tasks=str(tasks) if tasks is not None else None)
    for e in cost.table:
        console.print(f"  {e['kind']:>4} rank {e['rank']:>3}: {e['seconds_per_step']:.3f} s/step")
    console.print(f"saved: {cost.source}")


@app.command()
def tasks(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one object per task)")] = False,
) -> None:
    """List the built-in biology tasks with their ID/OOD splits and two examples each."""
    from dataclasses import asdict

    from stagebudget.tasks import DEFAULT_TASKS, render_examples, task_infos

    rows = []
    for info in task_infos():
        examples = [{"prompt": e.prompt, "answer": e.answer, "split": e.split}
                    for e in render_examples(info.name, n=2)]
        rows.append({**asdict(info), "default": info.name in DEFAULT_TASKS, "examples": examples})
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title="built-in tasks (* = in the default suite)", show_lines=True)
    for col in ("task", "domain", "ID split", "OOD split", "scorer", "examples"):
        table.add_column(col)
    for r in rows:
        ex = "\n".join(f"{e['prompt']} -> {e['answer']}  ({e['split']})" for e in r["examples"])
        table.add_row(r["name"] + (" *" if r["default"] else ""), r["domain"], r["id_split"],
                      r["ood_split"], r["scorer"], ex)
    console.print(table)


@base_app.command("build")
def base_build(
    size: Annotated[str, typer.Option(help="tiny (default) or test")] = "tiny",
    force: Annotated[bool, typer.Option(help="Rebuild even if cached")] = False,
    ship: Annotated[bool, typer.Option(
        help="Replace the shipped builtin:SIZE with this build (maintainers: every number "
             "measured on the default changes)")] = False,
) -> None:
    """Run the recipe that made the shipped base, into the cache (never replacing builtin:SIZE
    unless --ship is given). Pass the printed directory as base_model to use the build."""
    from stagebudget.modelref import SHIPPED_DIR, same_weights, ship_base
    from stagebudget.training.model import build_base

    path = build_base(size=size, force=force, progress=lambda m: console.print(m))
    info = path / "base_info.json"
    console.print(f"base model: {path}")
    if info.is_file():
        console.print(info.read_text())
    shipped = SHIPPED_DIR / size
    if ship:
        console.print(f"shipped as builtin:{size}: {ship_base(path, size)}")
    elif (shipped / "base_info.json").is_file():
        verdict = ("identical to" if same_weights(path, shipped)
                   else "different from (this machine's kernels or versions differ)")
        console.print(f"this build is {verdict} the shipped builtin:{size} ({shipped})")


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = None) -> None:
    """List the cached stage checkpoints, least recently used first."""
    import time

    from rich.table import Table

    from stagebudget.prefixcache import PrefixCache

    cache = PrefixCache(cache_dir)
    entries = cache.all_entries()
    table = Table("key", "entry", "steps", "holds", "MB", "last used")
    total = 0
    for entry in entries:
        size = entry.size()
        total += size
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(
            (entry.path / "MANIFEST.json").stat().st_mtime))
        table.add_row(entry.key[:12], entry.kind, str(entry.steps), entry.holds(),
                      f"{size / 1e6:.1f}", used)
    console.print(table)
    console.print(f"{len(entries)} entries, {total / 1e6:.1f} MB in {cache.root}")


@cache_app.command("prune")
def cache_prune(
    cache_dir: CacheDir = None,
    max_gb: Annotated[float, typer.Option(
        help="Keep at most this many GB, evicting least recently used entries first")] = 0.0,
) -> None:
    """Evict least recently used checkpoints down to --max-gb (default 0: empty the cache)."""
    from stagebudget.prefixcache import PrefixCache

    if max_gb < 0:
        raise UserError(f"--max-gb must be >= 0 (GB to keep), but got {max_gb}")
    cache = PrefixCache(cache_dir)
    removed = cache.evict(int(max_gb * 1e9))
    cache.clean_scratch()
    console.print(f"removed {len(removed)} entries; {cache.size() / 1e6:.1f} MB left in {cache.root}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user errors print one paragraph and exit 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        # The environment refused a file operation (full disk, read-only or forbidden path):
        # one paragraph naming the path; any other OSError is a bug and keeps its traceback.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        err_console.print(f"[bold red]error:[/bold red] cannot access{where}: "
                          f"{exc.strerror or exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; `stagebudget search ... --resume` continues a search")
        sys.exit(130)


if __name__ == "__main__":
    main()

"""GPU throughput (issue 15, part 4): SFT and GRPO of a ~100M-parameter local model in bf16.

    python bench/gpu.py [--work DIR] [--json FILE] [--sft-steps 40] [--rl-steps 8]
    python bench/gpu.py --smoke      # CPU, a tiny config, few steps: every in-process part runs
    python bench/gpu.py --results bench/RESULTS.md   # the GPU check: appends its table there

A Llama-shaped model is built from a config (random weights, stagebudget's built-in character
tokenizer, so the built-in suite's prompts apply) and saved as a local model directory. Measured
in one run, on one device, with the same stage settings everywhere (one :class:`StageSpec` each,
mapped to TRL by :mod:`stagebudget.stages.mapping` exactly as the search trains):

- ``matmul``: the device's measured bf16 matmul rate (the MFU denominator);
- SFT (full fine-tuning): tokens/s and MFU of a plain PyTorch loop (AdamW, bf16 autocast), of
  plain TRL ``SFTTrainer``, and of stagebudget's SFT stage (``run_schedule``); target >= 0.9x the
  plain loop. Tokens are the batch's non-padding tokens; FLOPs 6 x parameters per token;
- GRPO (LoRA): seconds per step and the share spent in ``GRPOTrainer._generate``, plain TRL
  against stagebudget's RL stage; target: stagebudget >= 1.5x faster;
- GRPO with vLLM generation (a stage's ``vllm`` setting, colocated) against transformers'
  ``generate``, when vLLM and CUDA are here (else the reason is printed);
- ``search``: the README's GPU path, ``stagebudget calibrate --space`` then a 4-trial search,
  two trials per GPU (``gpu: 0.5``), with vLLM generation off and (when it can run) on; the
  calibrate error is each trial's measured training seconds over its planned cost;
- ``cli``: the SFT -> RL schedule by ``stagebudget train`` and by a one-trial
  ``stagebudget search`` (wall time; not in ``--smoke``).

Nothing is asserted; it prints a markdown table (``--json`` writes the numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import BIN, NO_EVAL_BETWEEN, measure, space_document

# Model shapes: "full" is ~100M parameters (14 x 7.1M per layer); "smoke" runs on a CPU in seconds.
SHAPES: dict[str, dict[str, int]] = {
    "full": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 14,
             "num_attention_heads": 12, "num_key_value_heads": 12,
             "max_position_embeddings": 512},
    "smoke": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128},
}


def build_model(out: Path, shape: dict[str, int], seed: int = 0) -> int:
    """Save a randomly initialised Llama of ``shape`` with the built-in tokenizer to ``out``;
    return its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagebudget.modelref import config_dict
    from stagebudget.training.model import build_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(**{**config_dict("tiny"), **shape})  # token ids: the built-in model's
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer(out)
    return sum(p.numel() for p in model.parameters())


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, n: int, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul in bf16 (fp32 on a CPU, where bf16 is emulated)."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sft_rows(tokenizer: Any, suite: Any, n: int) -> list[str]:
    """SFT texts (prompt + answer + EOS) of the first ``n`` training examples."""
    return [e.prompt + e.answer + tokenizer.eos_token for e in suite.train[:n]]


def plain_sft_loop(model_dir: Path, suite: Any, device: str, batch: int, steps: int,
                   lr: float) -> dict[str, float]:
    """A hand-written full fine-tuning loop: AdamW, bf16 autocast on CUDA; tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    texts = sft_rows(tok, suite, batch * steps)
    warm, tokens, seconds = 2, 0, 0.0
    for i in range(steps):
        enc = tok(texts[i * batch:(i + 1) * batch], return_tensors="pt", padding=True).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=device.startswith("cuda")):
            loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warm:
            seconds += time.perf_counter() - start
            tokens += int(enc["attention_mask"].sum())
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / (steps - warm)}


def mean_tokens(model_dir: Path, suite: Any, n: int) -> float:
    """Mean non-padding tokens of an SFT row (BOS + prompt + answer + EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = sft_rows(tok, suite, n)
    return sum(len(tok(text=r)["input_ids"]) for r in rows) / len(rows)


@contextlib.contextmanager
def generation_timer() -> Iterator[dict[str, float]]:
    """Seconds spent in ``GRPOTrainer._generate`` (GRPO's sampling) while the block runs."""
    from trl import GRPOTrainer

    spent = {"generate_s": 0.0}
    original = GRPOTrainer._generate

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["generate_s"] += time.perf_counter() - start

    GRPOTrainer._generate = timed
    try:
        yield spent
    finally:
        GRPOTrainer._generate = original


def plain_trl(model_dir: Path, suite: Any, spec: Any, device: str, out: Path) -> dict[str, float]:
    """The stage in plain TRL (+ PEFT for a LoRA rank): seconds per step of the train loop."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from stagebudget.training.stages.rl import suite_reward
    from stagebudget.trlconfig import lora_kwargs, precision_kwargs, trl_config_kwargs

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device)
    args = {**trl_config_kwargs(spec, seed=0), **precision_kwargs(device),
            "output_dir": str(out)}
    if args.get("bf16") and not torch.cuda.is_bf16_supported():
        args["bf16"] = False
    lora = LoraConfig(**lora_kwargs(spec)) if lora_kwargs(spec) else None
    if spec.kind == "rl":
        data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer, "task": e.task}
                                  for e in suite.train])
        trainer: Any = GRPOTrainer(model=model, reward_funcs=[suite_reward(suite)],
                                   args=GRPOConfig(**args), train_dataset=data,
                                   processing_class=tok, peft_config=lora)
    else:
        data = Dataset.from_list([{"prompt": e.prompt, "completion": e.answer + tok.eos_token}
                                  for e in suite.train])
        trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data,
                             processing_class=tok, peft_config=lora)
    with generation_timer() as spent:
        runtime = float(trainer.train().metrics["train_runtime"])
    return {"s_per_step": runtime / spec.steps, "generate_share": spent["generate_s"] / runtime}


def stagebudget_stage(model_dir: Path, tasks: Any, spec: Any, device: str,
                      out: Path) -> dict[str, float]:
    """The stage as stagebudget trains it (``run_schedule``): seconds per step of its training
    (evaluation excluded, as its ledger measures it)."""
    from stagebudget.schedule import Schedule
    from stagebudget.training.pipeline import run_schedule

    schedule = Schedule(base_model=str(model_dir), tasks=tasks, stages=(spec,), seed=0)
    with generation_timer() as spent:
        result = run_schedule(schedule, out, device=device)
    [stage] = result.metrics["stages"]
    seconds = float(stage["measured_seconds"])
    return {"s_per_step": seconds / max(1, int(stage["steps_done"])),
            "generate_share": spent["generate_s"] / seconds if seconds else 0.0}


def stage_specs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The SFT (full fine-tuning) and RL (LoRA) stages measured, demo-like."""
    from stagebudget.schedule import StageSpec

    sft = StageSpec(kind="sft", steps=args.sft_steps, lora_rank=0, batch_size=args.batch,
                    learning_rate=1e-4, eval_interval=NO_EVAL_BETWEEN)
    rl = StageSpec(kind="rl", steps=args.rl_steps, lora_rank=16, batch_size=args.rl_batch,
                   num_generations=args.rl_generations, max_completion_length=14, temperature=1.2,
                   learning_rate=1e-3, eval_interval=NO_EVAL_BETWEEN)
    return sft, rl


def run_sft(model_dir: Path, n_params: int, peak: float, args: argparse.Namespace,
            work: Path) -> dict[str, Any]:
    from stagebudget.schedule import TasksRef
    from stagebudget.tasks import load_suite

    sft, _ = stage_specs(args)
    tasks = TasksRef(n_train=args.batch * args.sft_steps, n_id_test=args.n_test,
                     n_ood_test=args.n_test)
    suite = load_suite(**tasks.suite_args())
    per_row = mean_tokens(model_dir, suite, args.batch * args.sft_steps)
    out: dict[str, Any] = {"plain_loop": plain_sft_loop(model_dir, suite, args.device,
                                                        args.batch, args.sft_steps, 1e-4)}
    for name, row in (("plain_trl", plain_trl(model_dir, suite, sft, args.device, work / "trl")),
                      ("stagebudget", stagebudget_stage(model_dir, tasks, sft, args.device,
                                                        work / "sb-sft"))):
        out[name] = {"tokens_per_s": per_row * args.batch / row["s_per_step"], **row}
    for row in out.values():
        row["mfu"] = 6 * n_params * row["tokens_per_s"] / peak
        row["x_plain_loop"] = row["tokens_per_s"] / out["plain_loop"]["tokens_per_s"]
    return out


def run_grpo(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from stagebudget.schedule import TasksRef, VLLMSpec
    from stagebudget.tasks import load_suite

    _, rl = stage_specs(args)
    tasks = TasksRef(n_train=args.rl_batch * args.rl_steps * 2, n_id_test=args.n_test,
                     n_ood_test=args.n_test)
    suite = load_suite(**tasks.suite_args())
    out: dict[str, Any] = {
        "plain_trl": plain_trl(model_dir, suite, rl, args.device, work / "trl-rl"),
        "stagebudget": stagebudget_stage(model_dir, tasks, rl, args.device, work / "sb-rl")}
    out["stagebudget"]["speedup_vs_trl"] = (out["plain_trl"]["s_per_step"]
                                            / out["stagebudget"]["s_per_step"])
    problem = vllm_unavailable(args.device)
    if problem is None:
        with_vllm = rl.model_copy(update={"vllm": VLLMSpec(
            gpu_memory_utilization=args.vllm_memory)})
        out["stagebudget_vllm"] = stagebudget_stage(model_dir, tasks, with_vllm, args.device,
                                                    work / "sb-rl-vllm")
        out["stagebudget_vllm"]["speedup_vs_stagebudget"] = (
            out["stagebudget"]["s_per_step"] / out["stagebudget_vllm"]["s_per_step"])
    else:
        out["vllm_skipped"] = problem
    return out


def vllm_unavailable(device: str) -> str | None:
    """Why the vLLM rows cannot run here (None: they can)."""
    from stagebudget.training.vllmcheck import vllm_problem

    if not device.startswith("cuda"):
        return "vLLM generates on CUDA GPUs only"
    return vllm_problem()


def search_space(model_dir: Path, args: argparse.Namespace, vllm: bool) -> dict[str, Any]:
    """The README's GPU path as a space: 4 distinct trials (SFT share x RL rank, grid sampler),
    two at a time sharing one GPU (``gpu: 0.5``; on a CPU one thread each), bf16 on CUDA."""
    cuda = args.device.startswith("cuda")
    data = space_document(str(model_dir), args.search_hours, 4000, args.n_test)
    data.update(name="gpu-search-vllm" if vllm else "gpu-search", trials=4, concurrency=2,
                device=args.device, sampler={"name": "grid"},
                resources_per_trial={"cpu": 1, "gpu": 0.5 if cuda else 0})
    data["stages"]["sft"]["share"] = {"type": "categorical", "choices": [0.25, 0.5]}
    data["stages"]["rl"]["lora_rank"] = {"type": "categorical", "choices": [4, 16]}
    if vllm:  # two colocated engines on one GPU: a quarter of its memory each
        data["stages"]["rl"]["vllm"] = {"gpu_memory_utilization": 0.25}
    return data


def run_search(model_dir: Path, args: argparse.Namespace, work: Path,
               vllm: bool = False) -> dict[str, Any]:
    """``stagebudget calibrate --space`` (GPU-seconds on CUDA), then a 4-trial search priced by
    that table; the calibrate error is each trial's measured training seconds over its planned
    (load-free) cost."""
    import yaml

    tag = "vllm" if vllm else "plain"
    folder = work / f"search-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    data = search_space(model_dir, args, vllm)
    (folder / "calibrate.yaml").write_text(yaml.safe_dump(data))
    env = dict(os.environ)
    calib = measure([str(BIN / "stagebudget"), "calibrate", "--space",
                     str(folder / "calibrate.yaml"), "-o", str(folder / "cost.json")],
                    env, folder / "calibrate.log")
    (folder / "space.yaml").write_text(yaml.safe_dump({**data, "cost_table": "cost.json"}))
    search = measure([str(BIN / "stagebudget"), "search", str(folder / "space.yaml"), "--name",
                      tag, "--runs-dir", str(folder / "runs"), "--no-live"], env,
                     folder / "search.log")
    status = subprocess.run([str(BIN / "stagebudget"), "status", str(folder / "runs" / tag),
                             "--json"], env=env, capture_output=True, text=True, check=True)
    trials = [t for t in json.loads(status.stdout)["trials"] if t["state"] == "COMPLETE"]
    ratios = [t["measured_device_seconds"] / (t["nominal_device_hours"] * 3600) for t in trials
              if t.get("measured_device_seconds") and t.get("nominal_device_hours")]
    return {"calibrate_s": calib["wall_s"], "search_wall_s": search["wall_s"],
            "search_peak_mib": search["peak_mib"], "complete": len(trials),
            "measured_over_planned": ratios,
            "calibrate_error": max((abs(r - 1) for r in ratios), default=None)}


def run_cli(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The SFT -> RL schedule a one-point space plans: by `stagebudget train` and by a one-trial
    `stagebudget search` on the device (wall time, peak memory)."""
    import yaml

    from stagebudget.space.schema import SearchSpace

    data = space_document(str(model_dir), args.per_trial_hours, 4000, args.n_test)
    data.update(device=args.device, resources_per_trial={"cpu": 1, "gpu": 1})
    space_file = work / "space.yaml"
    space_file.write_text(yaml.safe_dump(data))
    space = SearchSpace.load(space_file)
    point = {name: d.choices[0] for name, d in space.dimensions().items()}
    schedule = space.schedule_from_params(point, space.cost_model(args.device))
    schedule.save(work / "schedule.yaml")
    env = dict(os.environ)
    train = measure([str(BIN / "stagebudget"), "train", str(work / "schedule.yaml"), "-o",
                     str(work / "cli-train"), "--no-save", "--device", args.device], env,
                    work / "cli-train.log")
    search = measure([str(BIN / "stagebudget"), "search", str(space_file), "--name", "one",
                      "--runs-dir", str(work / "runs"), "--no-live"], env, work / "cli-search.log")
    return {"schedule": schedule.describe(), "train": train, "search": search,
            "search_x_train": search["wall_s"] / train["wall_s"]}


def report(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device_name']}; model: {result['params'] / 1e6:.3g}M parameters; "
             f"measured matmul: {result['peak_flops'] / 1e12:.3g} TFLOP/s ({result['dtype']})", ""]
    if "sft" in result:
        lines += ["| SFT (full FT) | tokens/s | MFU | x plain loop |", "|---|---|---|---|"]
        for name, row in result["sft"].items():
            lines.append(f"| {name} | {row['tokens_per_s']:.0f} | {row['mfu']:.1%} | "
                         f"{row['x_plain_loop']:.2f} |")
    if "grpo" in result:
        lines += ["", "| GRPO (LoRA 16) | s/step | share generating |", "|---|---|---|"]
        for name, row in result["grpo"].items():
            if isinstance(row, dict):  # "vllm_skipped" holds the reason, not a row
                lines.append(f"| {name} | {row['s_per_step']:.3f} | {row['generate_share']:.0%} |")
        speedup = result["grpo"]["stagebudget"]["speedup_vs_trl"]
        lines.append(f"stagebudget vs plain TRL GRPO: {speedup:.2f}x faster (target >= 1.5x)")
    if "grpo" in result and "stagebudget_vllm" in result["grpo"]:
        lines.append(f"vLLM generation: {result['grpo']['stagebudget_vllm']['speedup_vs_stagebudget']:.2f}x "
                     "faster GRPO steps than transformers' generate")
    elif "grpo" in result:
        lines.append(f"vLLM rows not measured: {result['grpo'].get('vllm_skipped')}")
    for key, name in (("search", "transformers generation"), ("search_vllm", "vLLM generation")):
        if key in result:
            r = result[key]
            ratios = ", ".join(f"{x:.2f}" for x in r["measured_over_planned"]) or "none"
            err = "n/a" if r["calibrate_error"] is None else f"{r['calibrate_error']:.0%}"
            lines.append(f"4-trial search, 2 per GPU, {name}: {r['complete']}/4 complete, "
                         f"calibrate {r['calibrate_s']:.0f} s, search {r['search_wall_s']:.0f} s; "
                         f"measured/planned training seconds {ratios} (calibrate error at most "
                         f"{err})")
        elif key == "search_vllm" and "search_vllm_skipped" in result:
            lines.append(f"4-trial search with vLLM not run: {result['search_vllm_skipped']}")
    if "cli" in result:
        c = result["cli"]
        lines += ["", f"{c['schedule']}: `stagebudget train` {c['train']['wall_s']:.1f} s, "
                  f"one-trial search {c['search']['wall_s']:.1f} s ({c['search_x_train']:.2f}x)"]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--parts", default=None, help="comma list of sft,grpo,search,cli")
    parser.add_argument("--vllm-memory", type=float, default=0.3,
                        help="vLLM's GPU memory share in the GRPO rows")
    parser.add_argument("--search-hours", type=float, default=0.004,
                        help="each trial's budget in the 4-trial search (device-hours)")
    parser.add_argument("--results", type=Path, default=None,
                        help="append the table, dated, to this markdown file (bench/RESULTS.md)")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--rl-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="SFT batch")
    parser.add_argument("--rl-batch", type=int, default=16, help="GRPO prompts per step")
    parser.add_argument("--rl-generations", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--per-trial-hours", "--budget-hours", dest="per_trial_hours", type=float,
                        default=0.01, help="each trial's budget (device-hours)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sft_steps, args.rl_steps, args.batch, args.n_test = 4, 1, 4, 8
        args.rl_batch, args.rl_generations, args.search_hours = 2, 2, 0.0005
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.parts = (args.parts or ("sft,grpo" if args.smoke else "sft,grpo,search,cli")).split(",")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parts asked for; print and return the numbers."""
    import torch

    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or `--smoke` on a CPU")
    work = args.work or Path(tempfile.mkdtemp(prefix="stagebudget-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    params = build_model(model_dir, SHAPES["smoke" if args.smoke else "full"])
    cuda = args.device.startswith("cuda")
    result: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "params": params, "dtype": "bf16" if cuda else "fp32",
        "peak_flops": matmul_rate(args.device, 8192 if cuda else 256)}
    if "sft" in args.parts:
        result["sft"] = run_sft(model_dir, params, result["peak_flops"], args, work)
    if "grpo" in args.parts:
        result["grpo"] = run_grpo(model_dir, args, work)
    if "search" in args.parts:
        result["search"] = run_search(model_dir, args, work)
        problem = vllm_unavailable(args.device)
        if problem is None:
            result["search_vllm"] = run_search(model_dir, args, work, vllm=True)
        else:
            result["search_vllm_skipped"] = problem
    if "cli" in args.parts:
        result["cli"] = run_cli(model_dir, args, work)
    text = report(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write(f"\n### bench/gpu.py, {time.strftime('%Y-%m-%d')} ({result['device_name']})\n\n"
                     f"{text}\n")
    return result


if __name__ == "__main__":
    main()

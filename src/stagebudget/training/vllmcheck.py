"""Can this machine sample a stage's completions with vLLM? Checked before any compute.

A stage's ``vllm`` setting (:class:`~stagebudget.schedule.VLLMSpec`) needs a CUDA GPU and a
vLLM release that the installed TRL supports (TRL's ``vllm`` extra names the range; the
``stagebudget[vllm]`` extra installs it). ``search`` and ``train`` refuse a space or schedule
that asks for it on a machine without both, naming the file and field, before anything is
written; a trial on a cluster node checks again when its stage starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from stagebudget.errors import UserError

INSTALL = "pip install 'stagebudget[vllm]'"


def supported_vllm() -> str:
    """The vLLM versions the installed TRL supports, from TRL's ``vllm`` extra (e.g.
    ``<=0.31.0,>=0.22.0``); empty when TRL names none."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        needs = requires("trl") or []
    except PackageNotFoundError:
        return ""
    for line in needs:
        req = Requirement(line)
        if req.name == "vllm" and req.marker is not None and req.marker.evaluate({"extra": "vllm"}):
            return ",".join(str(s) for s in sorted(req.specifier, key=lambda s: s.operator[0] != ">"))
    return ""


def vllm_problem() -> str | None:
    """Why vLLM generation cannot run here (no CUDA GPU, vLLM missing or of a version TRL does
    not support), or None when it can."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    import torch
    from packaging.specifiers import SpecifierSet

    problems = []
    if not torch.cuda.is_available():
        problems.append(f"this machine has no CUDA GPU (torch {torch.__version__} sees none)")
    wanted = supported_vllm()
    if find_spec("vllm") is None:
        problems.append("the vllm package is not installed")
    else:
        try:
            have = version("vllm")
        except PackageNotFoundError:
            have = "unknown"
        if wanted and have != "unknown" and have not in SpecifierSet(wanted):
            problems.append(f"vllm {have} is installed, but TRL supports {wanted}")
    return " and ".join(problems) if problems else None


def check_vllm(stages: Iterable[tuple[str, object]], source: str | Path | None) -> None:
    """Raise a one-paragraph UserError when a stage of ``stages`` (``(key, spec or dims)``
    pairs with a ``vllm`` attribute) asks for vLLM and :func:`vllm_problem` says it cannot run.
    """
    asking = [key for key, stage in stages if getattr(stage, "vllm", None) is not None]
    if not asking:
        return
    problem = vllm_problem()
    if problem is None:
        return
    where = f"{source}: " if source else ""
    wanted = supported_vllm()
    raise UserError(
        f"{where}field `{asking[0]}.vllm` asks for vLLM generation, but {problem}. vLLM samples "
        f"on a CUDA GPU: run there after `{INSTALL}` (vLLM {wanted or 'as TRL supports'}, the "
        f"versions the installed TRL supports), or leave `{asking[0]}.vllm` out to generate "
        "with transformers. Nothing was written")

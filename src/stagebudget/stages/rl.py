"""Import shim for :mod:`stagebudget.training.stages.rl` (exported scripts import
``rl_rows``, ``suite_reward`` and ``generating_model`` from here)."""

from __future__ import annotations

from stagebudget.training.stages.rl import (
    PARTIAL_CREDIT,
    REWARD_NAME,
    ZERO_STD_LOG,
    completion_text,
    generating_model,
    matched_gain,
    reward_metrics,
    rl_dataset,
    rl_rows,
    run_rl,
    stratified_order,
    stratum,
    suite_reward,
)

__all__ = ["PARTIAL_CREDIT", "REWARD_NAME", "ZERO_STD_LOG", "completion_text", "generating_model",
           "matched_gain",
           "reward_metrics",
           "rl_dataset", "rl_rows", "run_rl", "stratified_order", "stratum", "suite_reward"]

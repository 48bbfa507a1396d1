"""Import shim for :mod:`stagebudget.training.stages.rl` (exported scripts import
``rl_rows`` and ``suite_reward`` from here)."""

from __future__ import annotations

from stagebudget.training.stages.rl import (
    PARTIAL_CREDIT,
    REWARD_NAME,
    ZERO_STD_LOG,
    completion_text,
    matched_gain,
    reward_metrics,
    rl_dataset,
    rl_rows,
    run_rl,
    stratified_order,
    stratum,
    suite_reward,
)

__all__ = ["PARTIAL_CREDIT", "REWARD_NAME", "ZERO_STD_LOG", "completion_text", "matched_gain",
           "reward_metrics",
           "rl_dataset", "rl_rows", "run_rl", "stratified_order", "stratum", "suite_reward"]

"""Import shim, kept for the training scripts earlier versions exported
(``from stagebudget.stages.rl import rl_rows, suite_reward``); the stages live in
:mod:`stagebudget.training.stages`.
"""

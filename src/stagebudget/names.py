"""The names stagebudget writes and reads: trial statuses, metric names, record fields and the
Optuna user attributes. Constants, never retyped; everything else imports them from here.
"""

from __future__ import annotations

# Budgets are device-hours wherever they are stored or shown, seconds where they are timed.
SECONDS_PER_HOUR = 3600.0

# Trial statuses as records (and stagebudget's views of Optuna trials) spell them.
RUNNING, COMPLETE, FAILED, PRUNED, WAITING = "RUNNING", "COMPLETE", "FAILED", "PRUNED", "WAITING"
TWINS = "twins"  # a front's count of COMPLETE trials told a trained twin's result (no slot taken)
# Metric names reported to Ray and stored as objectives (constants, never retyped).
ID_ACCURACY = "id_accuracy"
OOD_ACCURACY = "ood_accuracy"
# Measured training device-hours of the schedule trained alone (reused prefixes included): a
# stopwatch, so it grows with the machine's load.
DEVICE_HOURS = "device_hours"
# Nominal cost: the device-hours the cost model planned for the schedule (load-free; what the
# planner fitted into the per-trial budget). A record field; older records have it only in
# their ledger's per-stage ``planned_seconds`` (see planned_hours).
PLANNED_DEVICE_HOURS = "planned_device_hours"
# What a trial really trained (reused prefixes excluded): the search budget is charged this.
SPENT_DEVICE_HOURS = "spent_device_hours"
# Standard errors of the objectives (in a record's objectives, curves and metrics.json).
ID_ACCURACY_SE = "id_accuracy_se"
OOD_ACCURACY_SE = "ood_accuracy_se"
STANDARD_ERROR_OF = {ID_ACCURACY: ID_ACCURACY_SE, OOD_ACCURACY: OOD_ACCURACY_SE}
# Reported (with the error text) by a trial that failed deterministically: recorded FAIL, not
# retried (see trainable.trial_trainable and tune_adapter.StudySearch).
DETERMINISTIC_FAILURE = "deterministic_failure"
# The Optuna user attribute that holds why stagebudget failed a trial (the record's `error`).
ERROR_ATTR = "error"
# The Optuna user attribute that holds the Ray trial id, which is also the record's key.
TUNE_ID_ATTR = "tune_trial_id"
# The error of a trial a killed (or Ctrl-C'ed) driver left running: `--resume` runs it again.
INTERRUPTED = "interrupted"
# Reported (with why) by a trial that early stopping stopped at a stage boundary: recorded
# PRUNED, never COMPLETE with partial scores (see stagebudget.searching.earlystop).
PRUNED_FLAG = "pruned"


# The torch intra-op thread count a trial trained with: CPU results depend on it bit for bit
# (reduction order), so the record, the export and `stagebudget train` carry it.
TORCH_THREADS = "torch_threads"

# Optuna user attributes stagebudget sets on trials and studies (see search/study_attrs).
SCHEDULE_ATTR = "schedule"
STEPS_ATTR = "steps_ran"
LR_ATTR = "learning_rates"
RECORD_ATTR = "record"
REFERENCE_ATTR = "reference"
VERSION_ATTR = "stagebudget_version"
RUN_DIR_ATTR = "run_dir"
SPACE_ATTR = "space"
SPACE_FILE_ATTR = "space_file"
PRUNED_ATTR = "pruned"
REUSED_ATTR = "reused_from"  # the record key of the trial whose measurements this one reused
# On a trial told its twin's result without a Tune trial (the Optuna number of the trial that
# trained the schedule): it cost nothing, so it is no trial slot (see tune_adapter.StudySearch).
TWIN_ATTR = "twin_of"

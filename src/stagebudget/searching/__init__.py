"""The search: the driver, its pre-run checks, study repair on resume, the Ray session, the
Tune adapter and trainable, early stopping, replay, the live view and the study attributes."""

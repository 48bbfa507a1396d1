"""Training one schedule: the stage pipeline, its budget clock, evaluation, the base model
(build and load), calibration and the console progress view. Heavy imports stay lazy."""

"""The search space: its YAML schema, distributions, sampler factory, planned points and the
checks of what it names. Imports only the package root and :mod:`stagebudget.plan`."""

"""Reading a run: the run view over the study and records, status, the report and exports.
Imports no torch, ray or trl."""

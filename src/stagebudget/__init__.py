"""stagebudget: decide how to spend a fixed post-training budget.

Heavy dependencies (torch, ray, trl, peft, plotly) are imported lazily, so
``import stagebudget`` and the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

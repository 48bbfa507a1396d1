"""Planning: the cost model and calibrated cost tables that turn a budget into step counts."""

"""ReContrast anomaly detection: data, model, loss, training, evaluation, inference, plots."""
__version__ = "0.1.0"

import os as _os

# OpenMP threads waiting for work sleep instead of spinning: on this project's CPU steps the
# same wall time for 10-20 % less CPU time, and a second job on the machine gets the cycles
# the spinning burned (docs/speed.md, "CPU time per iteration"). OpenMP reads this when torch
# loads it, so it applies where recontrast is imported first (the `recontrast` command, the
# batch's notebook kernels, which inherit it); a value already set (ACTIVE) is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

"""reprolab."""

# The `${trial_dir:${trial}}` resolver of the run dir (configs/paths/default.yaml) must exist in
# every process that resolves a run dir, a SLURM worker included: importing any reprolab module
# registers it (omegaconf only; no torch).
from reprolab.search import register_resolvers as _register_resolvers

_register_resolvers()

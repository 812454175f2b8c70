"""The outer loop: pseudo-gradients, the Nesterov outer step, and the per-round sync."""

from diloco.outer.nesterov import nesterov_step_
from diloco.outer.pseudo_gradient import (
    copy_flat_into_,
    flatten_params,
    pseudo_gradient,
    weighted_mean,
)

__all__ = [
    "copy_flat_into_",
    "flatten_params",
    "nesterov_step_",
    "pseudo_gradient",
    "weighted_mean",
]

from diloco.outer.sync import OuterHyperparams, OuterSync, SyncResult, params_sha256

__all__ += ["OuterHyperparams", "OuterSync", "SyncResult", "params_sha256"]

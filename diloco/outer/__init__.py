"""The outer loop: pseudo-gradients, error feedback, the outer optimizers, the per-round sync.

`pseudo_gradient.py` (anchor - local, flat vectors), `nesterov.py` (the SGD step),
`optimizers.py` (the `OuterOptimizer` implementations), `error_feedback.py`, `sync.py`
(`OuterSync`: one island's side of a round), `config.py` (the `outer` section).
The function `pseudo_gradient` is imported from its module (the package attribute of that
name is the module).
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.aggregate import weighted_mean as weighted_mean
    from diloco.outer.config import OuterConfig as OuterConfig
    from diloco.outer.config import build_outer_optimizer as build_outer_optimizer
    from diloco.outer.nesterov import nesterov_step_ as nesterov_step_
    from diloco.outer.optimizers import SgdOuter as SgdOuter
    from diloco.outer.optimizers import TorchOuter as TorchOuter
    from diloco.outer.pseudo_gradient import copy_flat_into_ as copy_flat_into_
    from diloco.outer.pseudo_gradient import flatten_params as flatten_params
    from diloco.outer.sync import OuterHyperparams as OuterHyperparams
    from diloco.outer.sync import OuterSync as OuterSync
    from diloco.outer.sync import SyncResult as SyncResult
    from diloco.shared_state import params_sha256 as params_sha256

_EXPORTS = {
    "weighted_mean": "diloco.aggregate",
    "OuterConfig": "diloco.outer.config",
    "build_outer_optimizer": "diloco.outer.config",
    "nesterov_step_": "diloco.outer.nesterov",
    "SgdOuter": "diloco.outer.optimizers",
    "TorchOuter": "diloco.outer.optimizers",
    "copy_flat_into_": "diloco.outer.pseudo_gradient",
    "flatten_params": "diloco.outer.pseudo_gradient",
    "OuterHyperparams": "diloco.outer.sync",
    "OuterSync": "diloco.outer.sync",
    "SyncResult": "diloco.outer.sync",
    "params_sha256": "diloco.shared_state",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

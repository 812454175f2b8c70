"""An island of several ranks: its mesh, DDP or FSDP2 over it, and its batch split (issue 13).

`config.py` (the `island` section), `mesh.py` (which ranks form an island and which hold the
same shard, and their process groups), `wrap.py` (DDP / FSDP2 wrapping and the parameters a
rank owns), `batches.py` (an island batch split over ranks and micro-batches).
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.parallel.batches import batch_rows as batch_rows
    from diloco.parallel.batches import island_batch_size as island_batch_size
    from diloco.parallel.batches import rank_micro_batches as rank_micro_batches
    from diloco.parallel.batches import slice_rows as slice_rows
    from diloco.parallel.config import IslandSection as IslandSection
    from diloco.parallel.config import Parallelism as Parallelism
    from diloco.parallel.mesh import IslandLayout as IslandLayout
    from diloco.parallel.mesh import IslandMesh as IslandMesh
    from diloco.parallel.mesh import backend_for as backend_for
    from diloco.parallel.mesh import build_mesh as build_mesh
    from diloco.parallel.mesh import resolve_mesh as resolve_mesh
    from diloco.parallel.wrap import gradient_sync_paused as gradient_sync_paused
    from diloco.parallel.wrap import local_parameters as local_parameters
    from diloco.parallel.wrap import sharded_blocks as sharded_blocks
    from diloco.parallel.wrap import unwrap as unwrap
    from diloco.parallel.wrap import wrap_model as wrap_model

_EXPORTS = {
    "batch_rows": "diloco.parallel.batches",
    "island_batch_size": "diloco.parallel.batches",
    "rank_micro_batches": "diloco.parallel.batches",
    "slice_rows": "diloco.parallel.batches",
    "IslandSection": "diloco.parallel.config",
    "Parallelism": "diloco.parallel.config",
    "IslandLayout": "diloco.parallel.mesh",
    "IslandMesh": "diloco.parallel.mesh",
    "backend_for": "diloco.parallel.mesh",
    "build_mesh": "diloco.parallel.mesh",
    "resolve_mesh": "diloco.parallel.mesh",
    "gradient_sync_paused": "diloco.parallel.wrap",
    "local_parameters": "diloco.parallel.wrap",
    "sharded_blocks": "diloco.parallel.wrap",
    "unwrap": "diloco.parallel.wrap",
    "wrap_model": "diloco.parallel.wrap",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

"""Data: the built-in corpus, token files, user factories, and selectors.

`base.py` holds `Batch` and the `DataSource` protocol; `config.py` the `data` section;
`factory.py` builds each island's source; `windows.py` (random windows of a token array, one
shard per island), `corpus.py` (stdlib), `token_files.py` (text, tokens), `noise.py`
(data.noise), `reference.py` (JEST's frozen reference); `selectors/`.
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.data.base import Batch as Batch
    from diloco.data.base import DataSource as DataSource
    from diloco.data.config import DataConfig as DataConfig
    from diloco.data.factory import build_data_sources as build_data_sources
    from diloco.data.windows import TokenWindows as TokenWindows

_EXPORTS = {
    "Batch": "diloco.data.base",
    "DataSource": "diloco.data.base",
    "DataConfig": "diloco.data.config",
    "build_data_sources": "diloco.data.factory",
    "TokenWindows": "diloco.data.windows",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

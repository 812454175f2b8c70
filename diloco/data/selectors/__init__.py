"""Selectors: which examples each island's inner loop trains on.

`base.py` holds the `Selector` protocol; `config.py` the `data.selector` section and the
selectors by name (`SELECTORS`, `build_selectors`); one module each: `uniform.py`, `jest.py`.
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.data.selectors.base import Selector as Selector
    from diloco.data.selectors.base import SelectorCost as SelectorCost
    from diloco.data.selectors.base import SelectorSetup as SelectorSetup
    from diloco.data.selectors.config import SELECTORS as SELECTORS
    from diloco.data.selectors.config import SelectorConfig as SelectorConfig
    from diloco.data.selectors.config import build_selectors as build_selectors
    from diloco.data.selectors.jest import JestSelector as JestSelector
    from diloco.data.selectors.uniform import UniformSelector as UniformSelector

_EXPORTS = {
    "Selector": "diloco.data.selectors.base",
    "SelectorCost": "diloco.data.selectors.base",
    "SELECTORS": "diloco.data.selectors.config",
    "SelectorConfig": "diloco.data.selectors.config",
    "SelectorSetup": "diloco.data.selectors.base",
    "build_selectors": "diloco.data.selectors.config",
    "JestSelector": "diloco.data.selectors.jest",
    "UniformSelector": "diloco.data.selectors.uniform",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

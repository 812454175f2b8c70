"""Selectors: which examples each island's inner loop trains on."""

from collections.abc import Callable

from diloco.data.selectors.base import Selector
from diloco.data.selectors.uniform import UniformSelector

SELECTORS: dict[str, Callable[[], Selector]] = {"uniform": UniformSelector}

__all__ = ["SELECTORS", "Selector", "UniformSelector"]

"""Data: the built-in corpus, token files, user factories, and selectors."""

from diloco.data.base import Batch, DataSource
from diloco.data.factory import build_data_sources
from diloco.data.windows import TokenWindows

__all__ = ["Batch", "DataSource", "TokenWindows", "build_data_sources"]

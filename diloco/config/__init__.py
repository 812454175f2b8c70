"""Typed configuration: the schema and how YAML files and overrides are merged into it."""

from diloco.config.load import load_config, to_container, to_yaml
from diloco.config.schema import IslandConfig

__all__ = ["IslandConfig", "load_config", "to_container", "to_yaml"]

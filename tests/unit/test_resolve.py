"""resolve_factory: `module:factory` paths from the config, with errors naming the key."""

from __future__ import annotations

import os.path
import sys
from pathlib import Path

import pytest

from diloco.errors import ConfigError
from diloco.resolve import resolve_factory


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve_factory may add the current directory to sys.path: undo it after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_resolves_a_function_and_a_dotted_attribute() -> None:
    """module:attr and module:attr.sub both return the object itself."""
    assert resolve_factory("os.path:join", "model.name") is os.path.join
    assert resolve_factory("os:path.join", "model.name") is os.path.join


def test_current_directory_is_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_imports: None
) -> None:
    """A user's my_model.py next to where they run the CLI is found."""
    (tmp_path / "diloco_test_user_model.py").write_text("def build(width=2):\n    return width\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "diloco_test_user_model", raising=False)
    factory = resolve_factory("diloco_test_user_model:build", "model.name")
    assert factory(width=5) == 5
    monkeypatch.delitem(sys.modules, "diloco_test_user_model")


@pytest.mark.parametrize("path", ["no_colon", ":build", "module:", ""])
def test_path_without_module_or_attribute(path: str) -> None:
    """Anything but module:factory is refused, quoting the key and the value."""
    with pytest.raises(
        ConfigError, match=f"model.name must look like module:factory, got {path!r}"
    ):
        resolve_factory(path, "model.name")


def test_missing_module() -> None:
    """A module that does not import names the key, the module and the import error."""
    with pytest.raises(
        ConfigError,
        match=r"data.name: cannot import module 'no_such_module_xyz' "
        r"\(No module named 'no_such_module_xyz'\)",
    ):
        resolve_factory("no_such_module_xyz:make", "data.name")


def test_module_with_a_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_imports: None
) -> None:
    """A user module that itself fails to import says which dependency is missing."""
    (tmp_path / "diloco_test_needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"model.name: cannot import module 'diloco_test_needs_dep' "
        r"\(No module named 'no_such_dependency_xyz'\)",
    ):
        resolve_factory("diloco_test_needs_dep:build", "model.name")


def test_missing_attribute() -> None:
    """A module without the factory names the key, the module and the attribute."""
    with pytest.raises(ConfigError, match=r"model.name: module 'math' has no attribute 'nope'"):
        resolve_factory("math:nope", "model.name")
    with pytest.raises(ConfigError, match=r"module 'os' has no attribute 'path.nope'"):
        resolve_factory("os:path.nope", "model.name")


def test_not_callable() -> None:
    """An attribute that cannot be called (a constant) is refused."""
    with pytest.raises(ConfigError, match=r"data.name: 'math:pi' is not callable"):
        resolve_factory("math:pi", "data.name")

"""resolve_factory: `module:factory` paths from the config, with errors naming the key."""

from __future__ import annotations

import os.path
import sys
from pathlib import Path

import pytest

from diloco.errors import ConfigError
from diloco.resolve import call_factory, resolve_factory


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


# --- a user module or factory that fails: the key and the module named, the cause kept -------


def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    """Write `name`.py in tmp_path and make tmp_path the current directory."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize(
    ("source", "reported"),
    [
        ("raise RuntimeError('no GPU driver')\n", "RuntimeError: no GPU driver"),
        ("def build(:\n    pass\n", "SyntaxError: "),
        ("import sys\nsys.exit(2)\n", "SystemExit: 2"),
        ("x = 1 / 0\n", "ZeroDivisionError: division by zero"),
        ("raise ValueError('first line\\nsecond line')\n", "ValueError: first line"),
    ],
    ids=["runtime-error", "syntax-error", "sys-exit", "zero-division", "two-lines"],
)
def test_a_module_that_fails_at_import_names_the_key_and_the_module(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_imports: None,
    source: str,
    reported: str,
) -> None:
    """Any exception while importing (not only ImportError) is the user's module failing."""
    user_module(tmp_path, monkeypatch, "diloco_test_broken", source)
    with pytest.raises(ConfigError) as caught:
        resolve_factory("diloco_test_broken:build", "model.name")
    message = str(caught.value)
    assert message.startswith("model.name: module 'diloco_test_broken' failed to import: ")
    assert reported in message and "\n" not in message
    assert caught.value.__cause__ is not None, "the original error is kept for --debug"


def test_call_factory_passes_what_diloco_gives_and_the_users_args(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_imports: None
) -> None:
    user_module(
        tmp_path,
        monkeypatch,
        "diloco_test_factory_ok",
        "def build(seq_len, width=2):\n    return (seq_len, width)\n",
    )
    built = call_factory(
        "diloco_test_factory_ok:build",
        "data.name",
        given={"seq_len": 16},
        args={"width": 5},
        args_key="data.args",
    )
    assert built == (16, 5)


@pytest.mark.parametrize(
    ("source", "reported"),
    [
        (
            "def build(width=2):\n    raise ValueError('width too odd')\n",
            "ValueError: width too odd",
        ),
        ("def build(width=2):\n    return {}['missing']\n", "KeyError: 'missing'"),
        ("def build(width=2):\n    return len(width)\n", "TypeError: object of type 'int' has"),
        ("def build(width=2):\n    raise MemoryError()\n", "MemoryError"),
    ],
    ids=["value-error", "key-error", "type-error-inside", "memory-error"],
)
def test_a_factory_that_raises_names_the_key_and_the_factory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_imports: None,
    source: str,
    reported: str,
) -> None:
    """The factory cannot build: a ConfigError (exit 2) naming model.name and module:factory,
    with the factory's own error, first line only, and the original kept as the cause."""
    user_module(tmp_path, monkeypatch, "diloco_test_factory_raises", source)
    with pytest.raises(ConfigError) as caught:
        call_factory(
            "diloco_test_factory_raises:build", "model.name", args={}, args_key="model.args"
        )
    message = str(caught.value)
    assert message.startswith("model.name: 'diloco_test_factory_raises:build' raised "), message
    assert reported in message and "\n" not in message
    assert caught.value.__cause__ is not None


def test_args_the_factory_does_not_take_name_the_args_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_imports: None
) -> None:
    """A misspelt model.args entry is named as model.args, not as a crash of the factory."""
    user_module(
        tmp_path, monkeypatch, "diloco_test_factory_args", "def build(width=2):\n    return width\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"^model\.args do not fit 'diloco_test_factory_args:build': got an unexpected "
        r"keyword argument 'widht'$",
    ):
        call_factory(
            "diloco_test_factory_args:build",
            "model.name",
            args={"widht": 3},
            args_key="model.args",
        )


def test_an_arg_that_diloco_passes_itself_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_imports: None
) -> None:
    """data.args.seq_len would collide with the seq_len diloco passes (a TypeError, exit 1)."""
    user_module(
        tmp_path,
        monkeypatch,
        "diloco_test_factory_twice",
        "def build(seq_len, **options):\n    return seq_len\n",
    )
    with pytest.raises(
        ConfigError,
        match=r"^data\.args\.seq_len cannot be set: diloco passes seq_len to "
        r"'diloco_test_factory_twice:build' itself \(from the config\)$",
    ):
        call_factory(
            "diloco_test_factory_twice:build",
            "data.name",
            given={"seq_len": 16},
            args={"seq_len": 8},
            args_key="data.args",
        )

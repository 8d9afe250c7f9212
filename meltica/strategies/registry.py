"""Strategies by name, with their parameter models (configuration and sweeps validate against them)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, TypeVar

import annotated_types
from pydantic import BaseModel, ValidationError

from meltica.errors import ConfigurationError
from meltica.strategies.base import Strategy, StrategyContext

S = TypeVar("S", bound=type[Strategy[Any]])

_REGISTRY: dict[str, type[Strategy[Any]]] = {}
_SOURCES: dict[str, str] = {}  # strategy name -> where it was registered from (`meltica strategies list`)
_LOADING: list[str] = []  # the source being imported; register_strategy records it

ENTRY_POINT_GROUP = "meltica.strategies"
PATHS_ENV = "MELTICA_STRATEGY_PATHS"
_directories: list[Path] = []  # from the configuration (`strategy_paths`), see use_strategy_directories
_loaded_directories: set[Path] = set()
_loaded_files: dict[Path, Any] = {}
_entry_points_loaded = False


def register_strategy(cls: S) -> S:
    """Class decorator: register ``cls`` under ``cls.name``. A second class with the same name is refused."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{cls.__qualname__} has no 'name' to register under", field="name")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise ConfigurationError(f"strategy {name!r} needs a pydantic 'Params' model", field="Params")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ConfigurationError(f"strategy name {name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[name] = cls
    _SOURCES.setdefault(name, _LOADING[-1] if _LOADING else _origin(cls))
    return cls


def _origin(cls: type) -> str:
    module = cls.__module__
    return "built-in" if module.startswith("meltica.") else f"module {module}"


def get_strategy(name: str) -> type[Strategy[Any]]:
    """The strategy class ``name`` refers to: a registered name, ``path/to/file.py:Class`` or ``module:Class``
    (see :func:`resolve_strategy`)."""
    return resolve_strategy(name)


def resolve_strategy(reference: str) -> type[Strategy[Any]]:
    """The one place a strategy reference becomes a class, in every command and worker process.

    * ``name`` — registered by the built-ins, by a ``meltica.strategies`` entry point of an installed
      package, or by a ``.py`` file in a configured strategies directory (``strategy_paths`` in the
      configuration, or ``MELTICA_STRATEGY_PATHS`` as a JSON list);
    * ``path/to/file.py:Class`` — the file is imported (relative paths from the current directory);
    * ``package.module:Class`` — the module is imported from ``sys.path`` (``PYTHONPATH``).

    The class is registered under its ``name`` (with or without ``@register_strategy``). Anything that
    cannot be loaded raises ``ConfigurationError`` saying why: an unknown strategy is never skipped.
    """
    target, colon, attribute = reference.rpartition(":")
    if not colon:
        load_strategy_sources()
        try:
            return _REGISTRY[reference]
        except KeyError:
            known = ", ".join(sorted(_REGISTRY)) or "none"
            raise ConfigurationError(
                f"unknown strategy {reference!r} (registered: {known}); a strategy of your own is given as "
                "path/to/file.py:Class or module:Class, or put in a strategies directory (strategy_paths)",
                field="strategy",
            ) from None
    load_strategy_sources()  # the built-ins first: a file may subclass one
    if not target or not attribute:
        raise ConfigurationError(f"strategy {reference!r}: expected path/to/file.py:Class or module:Class")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(Path(target))
        where = str(Path(target).resolve())
    else:
        where = f"module {target}"
        _LOADING.append(where)
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigurationError(f"strategy {reference!r}: cannot import module {target!r}: {exc}") from None
        finally:
            _LOADING.pop()
    cls = getattr(module, attribute, None)
    if cls is None:
        raise ConfigurationError(f"strategy {reference!r}: {where} has no {attribute!r}", field="strategy")
    return _adopt(cls, where, reference)


def _adopt(cls: Any, where: str, reference: str) -> type[Strategy[Any]]:
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigurationError(f"strategy {reference!r}: {cls!r} is not a Strategy subclass", field="strategy")
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and _REGISTRY.get(name) is cls):
        _LOADING.append(where)
        try:
            register_strategy(cls)
        finally:
            _LOADING.pop()
    return cls


def _import_file(path: Path) -> Any:
    resolved = path.expanduser().resolve()
    if resolved in _loaded_files:
        return _loaded_files[resolved]
    if not resolved.is_file():
        raise ConfigurationError(f"strategy file {str(path)!r} does not exist", field="strategy")
    # a stable, unique module name: pickling, dataclasses and pydantic need the module in sys.modules
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    module_name = f"meltica_user_strategies.{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"strategy file {str(path)!r} cannot be imported", field="strategy")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    _LOADING.append(str(resolved))
    try:
        spec.loader.exec_module(module)
    except ConfigurationError:
        sys.modules.pop(module_name, None)
        raise
    except Exception as exc:  # a broken strategy file refuses the command, with its own error
        sys.modules.pop(module_name, None)
        raise ConfigurationError(f"strategy file {str(resolved)!r} failed to import: {exc!r}") from exc
    finally:
        _LOADING.pop()
    _loaded_files[resolved] = module
    return module


def use_strategy_directories(directories: Iterable[Path | str]) -> None:
    """Directories whose ``*.py`` files register strategies by name (``strategy_paths`` in the configuration);
    imported when a strategy is first looked up."""
    for directory in directories:
        path = Path(directory).expanduser().resolve()
        if path not in _directories:
            _directories.append(path)
    if _directories:
        # child processes (optimize's pool, the paper and live workers) inherit the environment, so they
        # find the same strategies without reading this configuration file
        os.environ[PATHS_ENV] = json.dumps([str(path) for path in strategy_directories()])


def strategy_directories() -> list[Path]:
    """The configured strategies directories plus those of ``MELTICA_STRATEGY_PATHS`` (a JSON list)."""
    found = list(_directories)
    raw = os.environ.get(PATHS_ENV, "").strip()
    if raw:
        try:
            listed = json.loads(raw)
        except json.JSONDecodeError:
            listed = None
        if not (isinstance(listed, list) and all(isinstance(item, str) for item in listed)):
            raise ConfigurationError(f'{PATHS_ENV} must be a JSON list of directories, e.g. ["./strategies"]')
        for item in listed:
            path = Path(item).expanduser().resolve()
            if path not in found:
                found.append(path)
    return found


def load_strategy_sources() -> None:
    """Register every strategy Meltica can find: the built-ins, the ``meltica.strategies`` entry points of
    installed packages, and the ``.py`` files of the strategies directories. Cheap after the first call."""
    global _entry_points_loaded
    _load_builtins()
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
            dist = point.dist.name if point.dist is not None else "?"
            where = f"entry point {point.name} = {point.value} ({dist})"
            _LOADING.append(where)
            try:
                loaded = point.load()
            except Exception as exc:  # an installed plugin that cannot load refuses the command, loudly
                _entry_points_loaded = False
                raise ConfigurationError(f"strategy {where} failed to load: {exc!r}") from exc
            finally:
                _LOADING.pop()
            if inspect.isclass(loaded):
                _adopt(loaded, where, point.value)
    for directory in strategy_directories():
        if directory in _loaded_directories:
            continue
        if not directory.is_dir():
            raise ConfigurationError(f"strategies directory {str(directory)!r} does not exist", field="strategy_paths")
        for file in sorted(directory.glob("*.py")):
            if not file.name.startswith("_"):
                _import_file(file)
        _loaded_directories.add(directory)


def list_strategies() -> list[str]:
    load_strategy_sources()
    return sorted(_REGISTRY)


def strategy_sources() -> dict[str, str]:
    """Each registered strategy name and where it came from (built-in, entry point, file, module)."""
    load_strategy_sources()
    return {name: _SOURCES.get(name, "?") for name in sorted(_REGISTRY)}


def validate_params(name: str, params: Mapping[str, Any] | BaseModel) -> BaseModel:
    """``params`` checked against the strategy's model; ``ConfigurationError`` naming the first bad parameter."""
    model = get_strategy(name).Params
    if isinstance(params, model):
        return params
    data = params.model_dump() if isinstance(params, BaseModel) else dict(params)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(model)'}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(
            f"strategy {name!r}: invalid parameter {field or '(model)'}: {problems}",
            source=f"strategy:{name}",
            field=field,
            errors=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()],
        ) from None


def build_strategy(name: str, params: Mapping[str, Any] | BaseModel, ctx: StrategyContext) -> Strategy[Any]:
    """Validate ``params`` and construct the strategy on ``ctx``."""
    cls = get_strategy(name)
    return cls(validate_params(name, params), ctx)


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One numeric parameter as a sweep sees it: its kind, default and bounds (``None`` = unbounded)."""

    name: str
    kind: Literal["int", "float", "decimal"]
    default: Any
    ge: Any = None
    gt: Any = None
    le: Any = None
    lt: Any = None
    description: str | None = None


def param_space(name: str) -> dict[str, ParamSpec]:
    """The numeric parameters of strategy ``name`` (int / float / Decimal fields) with their bounds.

    Cross-field rules (``fast < slow``) are not expressible here; ``validate_params`` enforces them for
    every point a sweep proposes.
    """
    model = get_strategy(name).Params
    out: dict[str, ParamSpec] = {}
    for field_name, info in model.model_fields.items():
        annotation = info.annotation
        kind: Literal["int", "float", "decimal"]
        if annotation is int:
            kind = "int"
        elif annotation is float:
            kind = "float"
        elif annotation is Decimal:
            kind = "decimal"
        else:
            continue
        bounds: dict[str, Any] = {}
        for meta in info.metadata:
            for key, cls in (
                ("ge", annotated_types.Ge),
                ("gt", annotated_types.Gt),
                ("le", annotated_types.Le),
                ("lt", annotated_types.Lt),
            ):
                if isinstance(meta, cls):
                    bounds[key] = getattr(meta, key)
        out[field_name] = ParamSpec(
            name=field_name, kind=kind, default=info.default, description=info.description, **bounds
        )
    return out


def _load_builtins() -> None:
    # Importing the package registers the built-ins; a no-op after the first call.
    # lazy: the built-in strategies register themselves through this module: circular at import time
    import meltica.strategies.builtin  # noqa: F401

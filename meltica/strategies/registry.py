"""Strategies by name, with their parameter models (configuration and sweeps validate against them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, TypeVar

import annotated_types
from pydantic import BaseModel, ValidationError

from meltica.errors import ConfigurationError
from meltica.strategies.base import Strategy, StrategyContext

S = TypeVar("S", bound=type[Strategy[Any]])

_REGISTRY: dict[str, type[Strategy[Any]]] = {}


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
    return cls


def get_strategy(name: str) -> type[Strategy[Any]]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ConfigurationError(f"unknown strategy {name!r} (registered: {known})", field="strategy") from None


def list_strategies() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


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
    import meltica.strategies.builtin  # noqa: F401

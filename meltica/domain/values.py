"""Money, quantity and time primitives shared by every domain model (DESIGN.md §4).

Decimals: ``str``, ``int`` and ``Decimal`` are taken as they are; a ``float`` is converted through
``str()`` so ``0.1`` becomes ``Decimal("0.1")`` rather than its binary expansion. NaN, infinities and
booleans are refused. Times are timezone-aware UTC ``datetime``; naive datetimes are refused because
nobody can tell which clock they came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Self, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

DecimalLike = Decimal | int | str | float

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_decimal(value: object) -> Decimal:
    """Convert ``value`` to a finite ``Decimal``; raise ``ValueError`` when it is not one."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        # str() gives the shortest repr that round-trips, which is what the writer meant.
        result = Decimal(str(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    else:
        raise ValueError(f"expected a decimal number, got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError("NaN and infinity are not allowed")
    return result


def _non_negative(value: Decimal) -> Decimal:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _positive(value: Decimal) -> Decimal:
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def require_utc(value: datetime) -> datetime:
    """Return ``value`` converted to UTC; raise ``ValueError`` for a naive datetime."""
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError("naive datetime: timestamps must be timezone-aware UTC")
    return value.astimezone(UTC)


# Any finite decimal (PnL, signed position size).
Amount = Annotated[Decimal, BeforeValidator(to_decimal)]
# Quantities, fees, volumes: zero allowed, negative not.
NonNegativeDecimal = Annotated[Decimal, BeforeValidator(to_decimal), AfterValidator(_non_negative)]
# Prices, tick sizes, order quantities.
PositiveDecimal = Annotated[Decimal, BeforeValidator(to_decimal), AfterValidator(_positive)]
UtcDatetime = Annotated[datetime, AfterValidator(require_utc)]


def ms_to_utc(ms: int) -> datetime:
    """Exchange epoch milliseconds → aware UTC datetime (exact: no float on the way)."""
    if isinstance(ms, bool) or not isinstance(ms, int):
        raise TypeError(f"epoch milliseconds must be an int, got {type(ms).__name__}")
    return _EPOCH + timedelta(milliseconds=ms)


def utc_to_ms(ts: datetime) -> int:
    """Aware datetime → epoch milliseconds (sub-millisecond part truncated toward the past)."""
    delta = require_utc(ts) - _EPOCH
    return (delta.days * 86_400_000) + (delta.seconds * 1000) + (delta.microseconds // 1000)


class DomainModel(BaseModel):
    """Base of every value object and event: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied (``model_copy`` skips validation)."""
        data = self.model_dump()
        data.update(changes)
        return type(self).model_validate(data)


_M = TypeVar("_M", bound=BaseModel)
_CONSTRUCT_SPECS: dict[type[BaseModel], tuple[dict[str, Any], frozenset[str]]] = {}


def _construct_spec(cls: type[BaseModel]) -> tuple[dict[str, Any], frozenset[str]]:
    """``(every field in order -> its static default or None, the fields that must be given)``."""
    spec = _CONSTRUCT_SPECS.get(cls)
    if spec is None:
        fields = cls.model_fields
        if (
            cls.__pydantic_root_model__
            or cls.__pydantic_post_init__
            or cls.model_config.get("extra") == "allow"
            or any(f.alias is not None or f.validation_alias is not None for f in fields.values())
        ):
            raise TypeError(f"construct: {cls.__name__} needs pydantic's model_construct")
        # Static defaults only: a field without a default, or with a default factory, must be given.
        required = frozenset(n for n, f in fields.items() if f.is_required() or f.default_factory is not None)
        template = {n: None if n in required else f.default for n, f in fields.items()}
        spec = _CONSTRUCT_SPECS[cls] = (template, required)
    return spec


def slot_setters(cls: type, names: Sequence[str]) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of a slotted dataclass's fields, in the order of ``names`` (which must name every
    field, else ``RuntimeError`` at import: a hot path that stores an instance slot by slot must not miss a
    field or set one under another's name). Storing through them is what a frozen dataclass's ``__init__``
    does through ``object.__setattr__``, without its lookup: for objects built once per order or fill."""
    fields_of = [f.name for f in dataclasses.fields(cls)]
    if sorted(fields_of) != sorted(names) or len(set(names)) != len(names):
        raise RuntimeError(
            f"{cls.__name__}'s fields are {fields_of}, not {list(names)}: update its slot-by-slot builder"
        )
    return tuple(getattr(cls, name).__set__ for name in names)


_FIELD_SETS: dict[frozenset[str], set[str]] = {}
_SHARED_IDS: set[int] = set()  # id() of each set in _FIELD_SETS (kept alive there: ids stay unique)


def shared_fields_set(names: Iterable[str]) -> set[str]:
    """The one shared ``set`` of these field names, for the ``model_fields_set`` of many models.

    Models of one kind built the same way name the same fields, and pydantic keeps a set of them per
    instance (an intent's 20 names: 2.2 KB) — most of what a long backtest's orders, intents and fills hold.
    Domain models are frozen, and pydantic copies the set before it changes one (``model_copy``), so a
    shared set is never written to."""
    key = frozenset(names)
    shared = _FIELD_SETS.get(key)
    if shared is None:
        shared = _FIELD_SETS[key] = set(key)
        _SHARED_IDS.add(id(shared))
    return shared


def is_shared_fields_set(fields: set[str]) -> bool:
    """Whether ``fields`` is a set ``shared_fields_set`` handed out."""
    return id(fields) in _SHARED_IDS


def construct(cls: type[_M], values: dict[str, Any], fields_set: set[str] | None = None) -> _M:
    """``cls.model_construct(**values)`` for trusted values, without its generic per-field machinery.

    The same instance: ``__dict__`` in field order (``values`` plus the static defaults of the fields not
    given), ``model_fields_set`` the names given (``fields_set`` when given: a ``shared_fields_set`` of
    exactly those names), no extra, no private state. For the hot paths of a
    backtest, where every value is valid by construction; ``values`` must not name unknown fields, and a
    field without a static default must be given (``TypeError`` otherwise)."""
    template, required = _construct_spec(cls)
    if not values.keys() >= required:
        raise TypeError(f"construct: {cls.__name__} needs {sorted(required - values.keys())}")
    data = template.copy()
    data.update(values)  # (the keys keep the template's order)
    if len(data) != len(template):
        raise TypeError(f"construct: unknown fields for {cls.__name__}: {sorted(data.keys() - template.keys())}")
    model = object.__new__(cls)
    # (the instance slots' own setters: what ``object.__setattr__`` stores, without its lookup)
    _SET_DICT(model, data)
    _SET_FIELDS_SET(model, set(values) if fields_set is None else fields_set)
    _SET_EXTRA(model, None)
    _SET_PRIVATE(model, None)
    return model


_SET_DICT = BaseModel.__dict__["__dict__"].__set__
_SET_FIELDS_SET = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


_T_co = TypeVar("_T_co", covariant=True)


class ValueSequence(Sequence[_T_co]):
    """A read-only sequence whose items are built when read (bar times, price columns, equity points, order
    records): equal to any sequence of equal items and unhashable, as a list is."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # compared by value, as a list is

"""The one codec of every topic: JSON through pydantic, in an envelope naming the schema and version.

Wire format (UTF-8 JSON)::

    {"schema": "Trade", "version": 1, "data": {...model_dump_json()...}}

Decimals are JSON strings (exact), datetimes ISO-8601 aware UTC (``...Z``). ``decode`` never raises
anything but :class:`MessageRejected` for bad input; its ``reason`` names the offending field and its
``error_type`` is one of ``not_utf8``, ``invalid_json``, ``not_an_envelope``, ``wrong_schema``,
``unsupported_version``, ``validation_error``, ``unknown_topic``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from meltica.errors import MelticaError
from meltica.messaging.catalogue import Catalogue, TopicSpec, default_catalogue

ErrorType = Literal[
    "not_utf8",
    "invalid_json",
    "not_an_envelope",
    "wrong_schema",
    "unsupported_version",
    "validation_error",
    "unknown_topic",
]
_MAX_ERRORS = 3


class MessageRejected(MelticaError):  # noqa: N818 — the name the pipeline speaks
    """A message that does not decode; ``reason`` is the human reason, ``error_type`` the category."""

    default_reason = "message_rejected"

    def __init__(self, reason: str, *, error_type: ErrorType, topic: str | None = None) -> None:
        super().__init__(reason, reason=reason, error_type=error_type, topic=topic)
        self.error_type: ErrorType = error_type
        self.topic = topic


class SchemaMismatchError(MelticaError, TypeError):
    """``encode`` was handed a model that is not the topic's schema (a programming error)."""

    default_reason = "schema_mismatch"


class _Header(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schema_name: str = Field(alias="schema")
    version: int


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{_loc(err['loc'])}: {err['msg']}" for err in errors[:_MAX_ERRORS]]
    more = f" (+{len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
    return "; ".join(parts) + more


class Codec:
    """Encode/decode for the topics of one catalogue. Thread-safe, stateless after construction."""

    def __init__(self, catalogue: Catalogue | None = None) -> None:
        self.catalogue = catalogue if catalogue is not None else default_catalogue()
        self._envelopes: dict[str, TypeAdapter[Any]] = {}
        for spec in self.catalogue:
            model = create_model(
                f"{spec.schema_name}Envelope",
                __config__=ConfigDict(extra="forbid"),
                schema_name=(str, Field(alias="schema")),
                version=(int, ...),
                data=(spec.value_type, ...),
            )
            self._envelopes[spec.name] = TypeAdapter(model)

    def spec(self, topic: str | TopicSpec) -> TopicSpec:
        return self.catalogue.spec(topic)

    def encode(self, topic: str | TopicSpec, model: BaseModel) -> bytes:
        spec = self.catalogue.spec(topic)
        if type(model) not in spec.accepts:
            allowed = ", ".join(cls.__name__ for cls in spec.accepts)
            raise SchemaMismatchError(
                f"topic {spec.name} carries {allowed}, not {type(model).__name__}",
                topic=spec.name,
                got=type(model).__name__,
            )
        header = f'{{"schema":{json.dumps(spec.schema_name)},"version":{spec.schema_version},"data":'
        return header.encode() + model.model_dump_json().encode() + b"}"

    def decode(self, topic: str | TopicSpec, raw: bytes | bytearray | memoryview | None) -> Any:
        """The model carried by ``raw``; :class:`MessageRejected` for anything malformed."""
        try:
            spec = self.catalogue.spec(topic)
        except KeyError as exc:
            raise MessageRejected(str(exc), error_type="unknown_topic", topic=str(topic)) from None
        name = spec.name
        if raw is None:
            raise MessageRejected("empty message (no value; a tombstone?)", error_type="not_an_envelope", topic=name)
        data = bytes(raw)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageRejected(
                f"not UTF-8: {exc.reason} at byte {exc.start}", error_type="not_utf8", topic=name
            ) from None
        # 0. the well-formed message, parsed once (the steps below parse it twice to say what is wrong)
        try:
            envelope = self._envelopes[name].validate_json(data)
        except ValidationError:
            pass
        else:
            if envelope.schema_name == spec.schema_name and envelope.version == spec.schema_version:
                return envelope.data
        # 1. JSON object with a schema/version header
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise MessageRejected(f"invalid JSON: {exc}", error_type="invalid_json", topic=name) from None
        if not isinstance(parsed, dict) or "data" not in parsed:
            raise MessageRejected(
                "not a meltica envelope: expected a JSON object with schema, version and data",
                error_type="not_an_envelope",
                topic=name,
            )
        try:
            header = _Header.model_validate(parsed)
        except ValidationError as exc:
            raise MessageRejected(f"bad envelope: {_describe(exc)}", error_type="not_an_envelope", topic=name) from None
        if header.schema_name != spec.schema_name:
            raise MessageRejected(
                f"schema: got {header.schema_name!r}, topic {name} carries {spec.schema_name!r}",
                error_type="wrong_schema",
                topic=name,
            )
        if header.version != spec.schema_version:
            raise MessageRejected(
                f"version: {spec.schema_name} v{header.version} is not supported (this build reads "
                f"v{spec.schema_version})",
                error_type="unsupported_version",
                topic=name,
            )
        # 2. the payload, validated from the raw JSON (exact decimals, aware datetimes)
        try:
            envelope = self._envelopes[name].validate_json(data)
        except ValidationError as exc:
            raise MessageRejected(
                f"invalid {spec.schema_name}: {_describe(exc)}", error_type="validation_error", topic=name
            ) from None
        return envelope.data


_default: Codec | None = None


def default_codec() -> Codec:
    """A codec over ``Catalogue()`` (prefix from ``MELTICA_TOPIC_PREFIX``), built once."""
    global _default
    if _default is None:
        _default = Codec()
    return _default


def encode(topic: str | TopicSpec, model: BaseModel) -> bytes:
    return default_codec().encode(topic, model)


def decode(topic: str | TopicSpec, raw: bytes | bytearray | memoryview | None) -> Any:
    return default_codec().decode(topic, raw)

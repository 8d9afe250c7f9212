"""Messaging: the topic catalogue, the one codec, dead letters and topic admin (DESIGN.md §3).

Plain pydantic + stdlib (+ kafka-python's admin client, imported lazily): no Faust here — the Faust
wiring lives in ``streams/``.
"""

from meltica.messaging.catalogue import (
    DLQ,
    PREFIX_ENV,
    SPECS,
    Catalogue,
    KeyKind,
    TopicSpec,
    account_key,
    default_catalogue,
    market_key,
    position_key,
)
from meltica.messaging.codec import Codec, MessageRejected, SchemaMismatchError, decode, default_codec, encode
from meltica.messaging.dlq import DeadLetterRouter
from meltica.messaging.schemas import (
    ControlCommand,
    ControlMessage,
    DeadLetter,
    KillSwitchCommand,
    RejectedIntent,
    RiskDecisionMessage,
    SetParamsCommand,
    SubscribeCommand,
)

__all__ = [
    "DLQ",
    "PREFIX_ENV",
    "SPECS",
    "Catalogue",
    "Codec",
    "ControlCommand",
    "ControlMessage",
    "DeadLetter",
    "DeadLetterRouter",
    "KeyKind",
    "KillSwitchCommand",
    "MessageRejected",
    "RejectedIntent",
    "RiskDecisionMessage",
    "SchemaMismatchError",
    "SetParamsCommand",
    "SubscribeCommand",
    "TopicSpec",
    "account_key",
    "decode",
    "default_catalogue",
    "default_codec",
    "encode",
    "market_key",
    "position_key",
]

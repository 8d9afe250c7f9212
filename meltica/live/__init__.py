"""The live pipeline's core (DESIGN.md §3): processors that the Faust shell in ``streams/`` and the
in-memory bus run unchanged. No Faust or Prefect here."""

from meltica.live.processor import Emit, Incoming, Outgoing, Processor

__all__ = ["Emit", "Incoming", "Outgoing", "Processor"]

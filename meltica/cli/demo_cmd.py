"""`meltica demo`: the main job on embedded defaults."""

from __future__ import annotations


def demo() -> None:
    raise NotImplementedError

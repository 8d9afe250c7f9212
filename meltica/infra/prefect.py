"""Prefect: the ephemeral API by default (nothing to start); ``PREFECT_API_URL`` when set.

Prefect itself is not imported here (``meltica/`` never imports it); the health check is plain HTTP.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from meltica.infra._common import ServiceStatus, mask_url

__all__ = ["prefect_api_url", "prefect_status"]


def prefect_api_url() -> str | None:
    """``PREFECT_API_URL`` when set, else ``None`` (Prefect then runs an ephemeral API in-process)."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    return url or None


def prefect_status(timeout: float = 3.0) -> ServiceStatus:
    """Which Prefect API Meltica uses and, for a server URL, whether ``<url>/health`` answers."""
    url = prefect_api_url()
    if url is None:
        return ServiceStatus(
            "prefect",
            "Prefect ephemeral API",
            "in-process",
            True,
            detail="PREFECT_API_URL unset: each flow run starts a temporary API (nothing to start)",
        )
    health = url.rstrip("/") + "/health"
    if not health.startswith(("http://", "https://")):
        return ServiceStatus("prefect", "Prefect server", mask_url(url), False, detail="not an http(s) URL")
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
            ok = 200 <= resp.status < 300
            detail = f"/health answered {resp.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        ok = False
        detail = f"/health failed: {getattr(exc, 'reason', exc)}"
    return ServiceStatus("prefect", "Prefect server (PREFECT_API_URL)", mask_url(url), ok, detail=detail)

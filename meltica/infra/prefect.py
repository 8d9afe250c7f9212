"""Prefect: the ephemeral API by default (nothing to start); ``PREFECT_API_URL`` when set.

Prefect itself is not imported here (``meltica/`` never imports it): the health check and the REST calls
(trigger a deployment, follow a flow run) are plain HTTP, and deploying runs the ``prefect`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meltica.adapters.factory import ccxt_credentials
from meltica.config import load_settings
from meltica.errors import ConfigurationError, InfrastructureError, InfrastructureUnavailableError, MelticaError
from meltica.infra._common import ServiceStatus, mask_url, repo_root

__all__ = [
    "CANCELLING_TIMEOUT_SECONDS",
    "TERMINAL_STATES",
    "WORK_POOL",
    "ZOMBIE_AUTOMATION",
    "DeployResult",
    "DeploymentSpec",
    "FlowRunInfo",
    "PrefectApi",
    "deploy_flows",
    "deployment_specs",
    "prefect_api_url",
    "prefect_executable",
    "prefect_status",
    "project_checkout",
    "require_server_url",
    "server_command",
    "server_environment",
]


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


# --- deployments and on-demand runs, through the server's REST API and the `prefect` CLI -----------------

# The work pool every deployment in prefect.yaml names, and how its workers run flows (local processes).
WORK_POOL = "meltica"
WORK_POOL_TYPE = "process"

# Zombie detection (Prefect's recipe for self-hosted servers): every flow run emits a heartbeat event every
# FLOW_HEARTBEAT_SECONDS (prefect.yaml sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the runs' environment; Prefect's
# minimum is 30), and this automation marks Crashed a run whose heartbeats stop for ZOMBIE_AFTER_SECONDS without
# it reaching a final state: a run whose host died never stays Running.
FLOW_HEARTBEAT_SECONDS = 30
ZOMBIE_AFTER_SECONDS = 90
ZOMBIE_AUTOMATION = "meltica: crash flow runs whose heartbeats stopped"


def zombie_automation() -> dict[str, Any]:
    """The automation ``meltica flows deploy`` creates on the server (REST body of ``POST /automations/``)."""
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": (
            f"A flow run that sent a heartbeat and then none for {ZOMBIE_AFTER_SECONDS} s, without completing, "
            "failing or being cancelled, is marked Crashed (its worker or host died); made by `meltica flows deploy`."
        ),
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            ],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": ZOMBIE_AFTER_SECONDS,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": f"No heartbeat for {ZOMBIE_AFTER_SECONDS} s: the flow run's process or host died.",
            }
        ],
    }


# A cancel of a run whose process is gone (a host crash): nobody is left to confirm it, so the run would stay
# Cancelling (the zombie automation cannot help: Prefect refuses Cancelling -> Crashed). The server's
# cancellation-cleanup service marks a run Cancelled once it has been Cancelling this long (Prefect's default:
# 300 s); `meltica flows server` sets it, and `meltica flows deploy` warns when the server's is longer or off.
CANCELLING_TIMEOUT_SECONDS = 90
CANCELLING_TIMEOUT_ENV = "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_CANCELLING_TIMEOUT_SECONDS"


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment `meltica flows server` runs ``prefect server start`` with: no analytics, and a bounded
    Cancelling (:data:`CANCELLING_TIMEOUT_SECONDS`) unless the operator set their own."""
    env = {**environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault(CANCELLING_TIMEOUT_ENV, str(CANCELLING_TIMEOUT_SECONDS))
    return env


def cancelling_timeout_warning(server_settings: Mapping[str, Any]) -> str | None:
    """What is wrong with the server's bound on Cancelling runs (its ``GET /admin/settings``), or None."""
    cleanup = server_settings.get("server", {}).get("services", {}).get("cancellation_cleanup", {})
    if not cleanup:
        return None  # not a server that reports it (Prefect Cloud, another version): nothing to say
    if not cleanup.get("enabled", True):
        return (
            "the server's cancellation-cleanup service is off: a run cancelled after its host died stays "
            "Cancelling; start the server with `meltica flows server`"
        )
    timeout = float(cleanup.get("cancelling_timeout_seconds") or 0)
    if timeout > CANCELLING_TIMEOUT_SECONDS:
        return (
            f"the server ends a cancel nobody confirms after {timeout:.0f} s (a run cancelled after its host died "
            f"stays Cancelling that long); `meltica flows server` sets {CANCELLING_TIMEOUT_ENV}="
            f"{CANCELLING_TIMEOUT_SECONDS}"
        )
    return None


# Flow-run state types after which nothing more happens to the run.
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})

DEFAULT_SERVER_PORT = 4200


def start_hint(url: str | None = None) -> str:
    """How to start a server on loopback, on the port ``url`` (``PREFECT_API_URL``) names, else 4200."""
    port = DEFAULT_SERVER_PORT
    if url is not None:
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:  # a malformed port: the hint falls back to the default one
            port = DEFAULT_SERVER_PORT
    return (
        f"start the server: `meltica flows server --port {port}` (or `prefect server start --host 127.0.0.1 "
        f"--port {port}`), then `export PREFECT_API_URL=http://127.0.0.1:{port}/api`"
    )


@dataclass(frozen=True)
class FlowRunInfo:
    """What the API says about one flow run."""

    id: str
    name: str
    state_type: str
    state_name: str
    deployment: str = ""
    message: str = ""  # the state's message: why a run failed or crashed

    @property
    def is_final(self) -> bool:
        return self.state_type in TERMINAL_STATES


def prefect_executable() -> str:
    """The ``prefect`` command of the interpreter running Meltica (the venv's), else the one on ``PATH``."""
    beside = Path(sys.executable).with_name("prefect")
    if beside.is_file():
        return str(beside)
    found = shutil.which("prefect")
    if found is None:
        raise InfrastructureError("the `prefect` command is not installed (pip install prefect==3.8.8)")
    return found


def require_server_url(timeout: float = 5.0) -> str:
    """``PREFECT_API_URL`` when it is set and ``/health`` answers; a one-line error naming the fix otherwise.

    Deployments and workers need a real server: the ephemeral API lives only as long as one process.
    """
    url = prefect_api_url()
    if url is None:
        raise InfrastructureUnavailableError(
            f"PREFECT_API_URL is not set; deployments need a Prefect server: {start_hint()}"
        )
    status = prefect_status(timeout=timeout)
    if not status.running:
        raise InfrastructureUnavailableError(
            f"the Prefect server at {mask_url(url)} is unreachable ({status.detail}); {start_hint(url)}"
        )
    return url.rstrip("/")


class _TransientAnswerError(Exception):
    def __init__(self, code: int, detail: str, retry_after: float | None) -> None:
        super().__init__(code)
        self.code, self.detail, self.retry_after = code, detail, retry_after


def _retry_after(header: str | None) -> float | None:
    """``Retry-After`` in seconds (capped at 10 s); ``None`` when absent or an HTTP date."""
    try:
        return None if header is None else min(max(float(header), 0.0), 10.0)
    except ValueError:
        return None


class PrefectApi:
    """A few calls of the Prefect server REST API over plain HTTP (``meltica/`` never imports prefect)."""

    #: Answers a busy or restarting server gives (Prefect's own client retries the same ones): 503 is what the
    #: server answers when its database is locked, and the request was rolled back, so sending it again is safe.
    TRANSIENT_STATUS = frozenset({429, 502, 503, 504})

    def __init__(self, url: str, timeout: float = 10.0, retries: int = 5, backoff: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call; a transient answer (:attr:`TRANSIENT_STATUS`) is sent again up to ``retries`` times
        with exponential backoff (``Retry-After`` when the server gives one), then raised with its cause."""
        attempt = 0
        while True:
            try:
                return self._call_once(method, path, body)
            except _TransientAnswerError as answer:
                if attempt >= self.retries:
                    raise InfrastructureUnavailableError(
                        f"Prefect API {method} {path} answered {answer.code} {attempt + 1} times "
                        f"(the server is busy or restarting): {answer.detail}"
                    ) from None
                time.sleep(answer.retry_after if answer.retry_after is not None else self.backoff * 2**attempt)
                attempt += 1

    def _call_once(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the URL comes from PREFECT_API_URL, checked as http(s)
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise LookupError(path) from None
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code in self.TRANSIENT_STATUS:
                raise _TransientAnswerError(exc.code, detail, _retry_after(exc.headers.get("Retry-After"))) from None
            raise InfrastructureError(f"Prefect API {method} {path} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise InfrastructureUnavailableError(
                f"the Prefect server at {mask_url(self.url)} is unreachable ({getattr(exc, 'reason', exc)}); "
                f"{start_hint(self.url)}"
            ) from None
        return json.loads(raw) if raw else None

    def work_pool_exists(self, name: str) -> bool:
        try:
            self.call("GET", f"/work_pools/{urllib.parse.quote(name)}")
        except LookupError:
            return False
        return True

    def deployment_id(self, flow_name: str, deployment_name: str) -> str:
        path = f"/deployments/name/{urllib.parse.quote(flow_name)}/{urllib.parse.quote(deployment_name)}"
        try:
            deployment = self.call("GET", path)
        except LookupError:
            raise InfrastructureError(
                f"no deployment {flow_name}/{deployment_name} on the Prefect server: run `meltica flows deploy`"
            ) from None
        return str(deployment["id"])

    def deployment(self, flow_name: str, deployment_name: str) -> dict[str, Any]:
        path = f"/deployments/name/{urllib.parse.quote(flow_name)}/{urllib.parse.quote(deployment_name)}"
        found: dict[str, Any] = self.call("GET", path)
        return found

    def set_paused(self, deployment_id: str, paused: bool, description: str | None) -> None:
        """Pause (or resume) a deployment's schedules; ``description`` replaces its description when given."""
        if description is not None:
            self.call("PATCH", f"/deployments/{deployment_id}", {"description": description})
        self.call("POST", f"/deployments/{deployment_id}/{'pause' if paused else 'resume'}_deployment")

    def ensure_automation(self, body: dict[str, Any]) -> bool:
        """Create the automation named ``body["name"]`` unless one exists (replacing an outdated one); True when
        it was created."""
        existing = [a for a in self.call("POST", "/automations/filter", {}) or [] if a.get("name") == body["name"]]
        current = existing[0] if existing else None
        if current is not None and current.get("trigger", {}).get("within") == body["trigger"]["within"]:
            return False
        for old in existing:
            self.call("DELETE", f"/automations/{old['id']}")
        self.call("POST", "/automations/", body)
        return True

    def server_settings(self) -> dict[str, Any]:
        """The server's own settings (``GET /admin/settings``; secrets come back masked)."""
        found: dict[str, Any] = self.call("GET", "/admin/settings") or {}
        return found

    def deployment_names(self) -> list[str]:
        """``flow/deployment`` for every deployment on the server."""
        flows = {f["id"]: f["name"] for f in self.call("POST", "/flows/filter", {"limit": 200})}
        rows = self.call("POST", "/deployments/filter", {"limit": 200})
        return sorted(f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in rows)

    def deployment_names_by_entrypoint(self) -> dict[tuple[str, str], str]:
        """``(entrypoint, deployment name) -> "flow name/deployment name"`` for every deployment on the server:
        the flow's real name (``@flow(name=…)``), which ``prefect deployment run`` needs, not its function's."""
        flows = {f["id"]: f["name"] for f in self.call("POST", "/flows/filter", {"limit": 200})}
        rows = self.call("POST", "/deployments/filter", {"limit": 200})
        return {(str(d.get("entrypoint")), str(d["name"])): f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in rows}

    def create_flow_run(self, flow_name: str, deployment_name: str, parameters: dict[str, Any]) -> FlowRunInfo:
        deployment_id = self.deployment_id(flow_name, deployment_name)
        run = self.call("POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters})
        return _flow_run_info(run, f"{flow_name}/{deployment_name}")

    def flow_run(self, flow_run_id: str) -> FlowRunInfo:
        return _flow_run_info(self.call("GET", f"/flow_runs/{urllib.parse.quote(flow_run_id)}"))

    def flow_run_artifacts(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        """The artifacts a flow run published, by key (``type`` and ``data``: markdown text, or a table's rows)."""
        rows = self.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        out: dict[str, dict[str, Any]] = {}
        for row in rows or []:
            data = row.get("data")
            if row.get("type") == "table" and isinstance(data, str):
                data = json.loads(data)
            out[str(row.get("key"))] = {"type": row.get("type"), "data": data}
        return out

    def wait_for_flow_run(
        self,
        flow_run_id: str,
        timeout: float,
        poll: float = 1.0,
        on_change: Callable[[FlowRunInfo], None] | None = None,
    ) -> FlowRunInfo:
        """Poll until the run reaches a terminal state (or ``timeout`` seconds pass: the last state seen)."""
        deadline = time.monotonic() + timeout
        seen = ""
        while True:
            info = self.flow_run(flow_run_id)
            if info.state_name != seen and on_change is not None:
                on_change(info)
            seen = info.state_name
            if info.is_final or time.monotonic() >= deadline:
                return info
            time.sleep(poll)


def _flow_run_info(run: dict[str, Any], deployment: str = "") -> FlowRunInfo:
    state = run.get("state") or {}
    return FlowRunInfo(
        id=str(run["id"]),
        name=str(run.get("name", "")),
        state_type=str(state.get("type") or run.get("state_type") or "PENDING"),
        state_name=str(state.get("name") or run.get("state_name") or "Pending"),
        deployment=deployment,
        message=str(state.get("message") or ""),
    )


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of ``prefect.yaml``: ``flow_function/name`` selects it for ``prefect deploy --name``."""

    name: str
    entrypoint: str

    @property
    def path(self) -> str:
        return self.entrypoint.rsplit(":", 1)[0]

    @property
    def selector(self) -> str:
        return f"{self.entrypoint.rsplit(':', 1)[-1]}/{self.name}"


def deployment_specs(project_file: Path) -> list[DeploymentSpec]:
    """The deployments ``prefect.yaml`` declares."""
    try:
        loaded = yaml.safe_load(project_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read {project_file}: {exc}", source=str(project_file)) from None
    return [
        DeploymentSpec(str(d["name"]), str(d["entrypoint"]))
        for d in loaded.get("deployments") or []
        if isinstance(d, dict) and d.get("name") and d.get("entrypoint")
    ]


@dataclass(frozen=True)
class DeployResult:
    deployed: list[str]
    skipped: list[str]
    created_pool: bool
    output: str
    paused: dict[str, str] = field(default_factory=dict)  # flow/deployment -> why its schedule is paused
    config_file: str = ""
    created_automation: bool = False
    cancelling_warning: str | None = None  # the server leaves a cancel nobody confirms Cancelling too long


# Where the scheduled ingest (prefect.yaml: exchange binance, no emulator) fetches its bars.
INGEST_VENUE = ("api.binance.com", 443)


def schedule_prerequisites(config_file: Path | None, probe_timeout: float = 3.0) -> dict[str, str]:
    """``flow/deployment -> what is missing`` for each scheduled deployment that would fail on every run here:
    the 15-minute reconciliation without an account that has a venue and credentials in the configuration,
    the hourly ingest without a connection to the exchange. Checked from the deploying shell, which should
    have the worker's environment."""
    missing: dict[str, str] = {}
    where = str(config_file) if config_file is not None else "the MELTICA_ENV configuration"
    try:
        settings = load_settings(config_file=config_file)
    except MelticaError as exc:
        missing["reconcile/every-15-minutes"] = f"the configuration cannot be loaded ({exc})"
    else:
        venues = [a for a in settings.accounts if a.exchange != "paper"]
        if not venues:
            missing["reconcile/every-15-minutes"] = f"no account with an exchange in {where}"
        else:
            for account in venues:
                try:
                    keys = ccxt_credentials(account, allow_plaintext=settings.environment != "prod")
                except MelticaError as exc:
                    keys, why = {}, str(exc)
                else:
                    why = "no api_key configured"
                if not keys.get("apiKey"):
                    missing["reconcile/every-15-minutes"] = f"account {account.name!r} has no usable keys: {why}"
                    break
    try:
        with socket.create_connection(INGEST_VENUE, timeout=probe_timeout):
            pass
    except OSError as exc:
        missing["ingest/hourly"] = f"{INGEST_VENUE[0]} cannot be reached from here ({exc})"
    return missing


def _run_prefect(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [prefect_executable(), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"`prefect {' '.join(args)}` did not finish within {timeout:.0f}s") from None


def _last_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])


def project_checkout(start: Path | None = None) -> Path:
    """The checkout to deploy: the nearest directory holding ``prefect.yaml`` and ``flows/`` from ``start``
    (default: the current directory) upwards — the checkout the operator is in, not the one the virtualenv's
    package was installed from; that one only when the current directory is in no checkout."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "prefect.yaml").is_file() and (candidate / "flows").is_dir():
            return candidate
    return repo_root()


def deploy_flows(root: Path | None = None, timeout: float = 300.0, config_file: Path | None = None) -> DeployResult:
    """Create the ``meltica`` process work pool if missing, then deploy every flow of ``prefect.yaml``.

    Runs the venv's ``prefect`` as a subprocess from the checkout (``root``, default
    :func:`project_checkout`) with ``MELTICA_HOME`` set to it: the deployments' pull step and their
    ``PYTHONPATH`` make workers run the flows — and ``meltica`` — from that checkout. A deployment whose flow
    file is not in this checkout is skipped (``prefect deploy`` imports every entrypoint and would fail on it).
    ``deployed`` lists the names ``prefect deployment run`` accepts: ``<flow name>/<deployment name>``.

    ``config_file`` (else ``MELTICA_CONFIG``) becomes every flow run's ``MELTICA_CONFIG``. A scheduled deployment
    whose prerequisites are missing (:func:`schedule_prerequisites`) is paused, its description saying why;
    deploying again once they are met resumes it.
    """
    url = require_server_url()
    root = (root or project_checkout()).resolve()
    project_file = root / "prefect.yaml"
    specs = deployment_specs(project_file)
    present = [s for s in specs if (root / s.path).is_file()]
    skipped = [s.selector for s in specs if s not in present]
    chosen = config_file or (Path(os.environ["MELTICA_CONFIG"]) if os.environ.get("MELTICA_CONFIG") else None)
    if chosen is not None:
        chosen = chosen.expanduser().resolve()
        if not chosen.is_file():
            raise ConfigurationError(f"configuration file {chosen} does not exist", source=str(chosen))
    config_text = str(chosen) if chosen is not None else ""
    env = {**os.environ, "PREFECT_API_URL": url, "MELTICA_HOME": str(root), "MELTICA_CONFIG": config_text}

    api = PrefectApi(url)
    created_pool = False
    if not api.work_pool_exists(WORK_POOL):
        done = _run_prefect(["work-pool", "create", WORK_POOL, "--type", WORK_POOL_TYPE], env, root, 120)
        if done.returncode != 0 and not api.work_pool_exists(WORK_POOL):
            raise InfrastructureError(
                f"creating work pool {WORK_POOL} failed: {_last_lines(done.stdout + done.stderr)}"
            )
        created_pool = True
    if not present:
        return DeployResult([], skipped, created_pool, "")

    selection = ["--all"] if not skipped else [arg for s in present for arg in ("--name", s.selector)]
    done = _run_prefect(["--no-prompt", "deploy", *selection], env, root, timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise InfrastructureError(f"`prefect deploy` failed: {_last_lines(output)}")
    deployed = api.deployment_names_by_entrypoint()
    names = [deployed.get((s.entrypoint, s.name), s.selector) for s in present]
    missing = schedule_prerequisites(chosen)
    paused: dict[str, str] = {}
    for name in names:
        flow_name, deployment_name = name.split("/", 1)
        deployment = api.deployment(flow_name, deployment_name)
        if not deployment.get("schedules"):
            continue
        if name in missing:
            paused[name] = missing[name]
            api.set_paused(deployment["id"], True, f"PAUSED: {missing[name]}. {deployment.get('description') or ''}")
        else:
            api.set_paused(deployment["id"], False, None)
    created_automation = api.ensure_automation(zombie_automation())
    try:
        warning = cancelling_timeout_warning(api.server_settings())
    except (LookupError, InfrastructureError):
        warning = None  # a server without the admin API: nothing to check
    return DeployResult(names, skipped, created_pool, output, paused, config_text, created_automation, warning)


def server_command(host: str = "127.0.0.1", port: int = 4200) -> list[str]:
    """The argv that runs a Prefect server (API and UI) on ``host:port``."""
    return [prefect_executable(), "server", "start", "--host", host, "--port", str(port)]

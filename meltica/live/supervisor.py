"""``meltica live start``: one live deployment's processes on one machine, supervised.

The deployment is one settings file; its processes (each also runs alone, on another machine) are::

    ingest        python -m streams.ingest --config FILE
    worker-NAME   python -m streams.worker --settings FILE --worker NAME      (one per live.workers[])
    sinks         python -m streams.sinks --settings FILE                     (when live.sinks)

:class:`Supervisor` runs any such list of children:

* each child writes stdout and stderr to ``<state_dir>/logs/<name>.log`` (appended; a header line per start);
* a child that exits while nobody asked it to is restarted after a back-off that doubles with each
  quick crash (``RestartPolicy``: initial, factor, cap; a child that ran ``stable_after_s`` starts over
  at the initial delay). A child that crashes ``max_crashes`` times within ``window_s`` fails the whole
  deployment: everything is stopped and :meth:`Supervisor.run` returns 1, naming the child, its exit
  status and the end of its log (fail closed: a pipeline with a stage missing must not keep trading);
* children die with the supervisor, even when it is SIGKILLed: on Linux each child asks the kernel for
  SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``); each child also runs in its own process
  group, so a Ctrl-C in the terminal reaches only the supervisor, which then stops them in order;
* SIGTERM, SIGINT or SIGHUP to the supervisor stops every child within ``stop_deadline_s``: SIGTERM to
  each child's process group, SIGKILL to those still running at the deadline. A ``before_stop`` hook
  (the optional cancel-all, :class:`CancelAllOnStop`) runs first, while the workers still run;
* ``<state_dir>/supervisor.json`` holds the supervisor's and every child's pid and state for
  ``meltica live status`` (:func:`read_state`); ``<state_dir>/supervisor.lock`` (``flock``) keeps a
  second supervisor of the same deployment from starting.

No Faust or Prefect here: the children are subprocesses.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from sqlalchemy import Engine

from meltica.config.loader import check_live
from meltica.config.settings import MelticaSettings
from meltica.errors import InfrastructureError, MelticaError
from meltica.infra.postgres import ensure_postgres, ensure_schema_at_head
from meltica.live.live_status import open_orders
from meltica.messaging.admin import admin_client, create_topics, default_bootstrap
from meltica.messaging.catalogue import Catalogue
from meltica.messaging.codec import Codec
from meltica.messaging.schemas import KillSwitchCommand
from meltica.secrets import resolve_secret
from meltica.secrets.master_key import MASTER_KEY_ENV, MASTER_KEY_FILE_ENV, NEW_MASTER_KEY_ENV
from meltica.secrets.references import plain_text
from meltica.storage import migrate

STATE_FILE = "supervisor.json"
LOCK_FILE = "supervisor.lock"
LOG_DIR = "logs"
STATE_VERSION = 1
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LOG_TAIL_LINES = 8
_LOG_HEADER = "=== meltica live"

Say = Callable[[str], None]


class SupervisorError(MelticaError):
    """The supervisor cannot start (another one runs, the state directory is unusable)."""

    default_reason = "supervisor_error"


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- what runs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One supervised process: its name (also its log file's), its command line and extra environment."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Back-off after a crash: ``initial_backoff_s × factor^(n-1)``, at most ``max_backoff_s``, where n counts
    the child's crashes since it last ran ``stable_after_s``. ``max_crashes`` within ``window_s``: give up."""

    initial_backoff_s: float = 1.0
    factor: float = 2.0
    max_backoff_s: float = 60.0
    stable_after_s: float = 120.0
    max_crashes: int = 5
    window_s: float = 300.0
    stop_deadline_s: float = 30.0

    def backoff(self, consecutive: int) -> float:
        return float(min(self.initial_backoff_s * self.factor ** max(consecutive - 1, 0), self.max_backoff_s))


def state_dir_of(settings: MelticaSettings) -> Path:
    """``live.state_dir``, else ``$MELTICA_STATE_DIR/live``, else ``.meltica/live``."""
    if settings.live.state_dir:
        return Path(settings.live.state_dir)
    return Path(os.environ.get("MELTICA_STATE_DIR") or ".meltica") / "live"


# --- the children's environment --------------------------------------------------------------------

_CHILD_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "TERM",
        "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    }
)  # fmt: skip
# Locale, the interpreter, Meltica's own settings and libpq's (the database when the URL leaves parts out).
_CHILD_ENV_PREFIXES = ("LC_", "PYTHON", "MELTICA_", "PG")
MIGRATION_URL_ENV = "MELTICA_DATABASE_MIGRATION_URL"
_ENV_REFERENCE = re.compile(r"env:([A-Za-z_][A-Za-z0-9_]*)")


def child_environment(
    settings: MelticaSettings, config_file: Path | str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the deployment's processes get: only what they need, not all the supervisor has.

    Passed: the variables the settings file (or a passed ``MELTICA_*`` value) references as ``env:NAME``;
    ``MELTICA_*`` (settings, state dir, database, Kafka); ``PG*``; ``PYTHON*``, ``LC_*``, ``PATH``, ``HOME``,
    ``LANG``, ``TZ``, temp dirs, CA bundles and proxies. The master key (``MELTICA_MASTER_KEY``,
    ``MELTICA_MASTER_KEY_FILE``) only when the deployment decrypts something: an ``encrypted:`` reference,
    or a venue account without ``api_key`` (its credentials come from the store ``meltica keys add``
    writes); ``MELTICA_NEW_MASTER_KEY`` (rotation) and ``MELTICA_DATABASE_MIGRATION_URL`` (the owner role)
    never. Everything else — other exchanges' keys, cloud
    credentials — is dropped. A variable the file names as ``env:NAME`` is always passed."""
    source = dict(os.environ if environ is None else environ)
    kept = {
        name: value
        for name, value in source.items()
        if name in _CHILD_ENV_NAMES or name.startswith(_CHILD_ENV_PREFIXES)
    }
    text = Path(config_file).read_text(encoding="utf-8")
    referenced = set(_ENV_REFERENCE.findall(text))
    for value in kept.values():
        referenced.update(_ENV_REFERENCE.findall(value))
    kept.update({name: source[name] for name in referenced if name in source})
    needs_master_key = (
        "encrypted:" in text
        or any(value.startswith("encrypted:") for value in kept.values())
        or any(a.exchange != "paper" and a.api_key is None for a in settings.accounts)
    )
    dropped = (NEW_MASTER_KEY_ENV,) if needs_master_key else (MASTER_KEY_ENV, MASTER_KEY_FILE_ENV, NEW_MASTER_KEY_ENV)
    for name in dropped:
        if name not in referenced:
            kept.pop(name, None)
    # The owner role's URL: the processes connect as the runtime role (database_url), never as the owner.
    kept.pop(MIGRATION_URL_ENV, None)
    if settings.database_migration_url is not None:
        reference = _ENV_REFERENCE.fullmatch(plain_text(settings.database_migration_url))
        if reference is not None:
            kept.pop(reference.group(1), None)
    return kept


def deployment_children(
    settings: MelticaSettings, config_file: Path | str, *, python: str = sys.executable
) -> list[ChildSpec]:
    """The processes of the deployment in ``config_file``, as the contract lists them."""
    path = str(Path(config_file).resolve())
    children = [ChildSpec("ingest", (python, "-m", "streams.ingest", "--config", path))]
    for worker in settings.live.workers:
        children.append(
            ChildSpec(
                f"worker-{worker.name}", (python, "-m", "streams.worker", "--settings", path, "--worker", worker.name)
            )
        )
    if settings.live.sinks:
        children.append(ChildSpec("sinks", (python, "-m", "streams.sinks", "--settings", path)))
    return children


# --- children ------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGTERM to this child when the supervisor dies, however it dies (Linux).

    The kernel sends it when the *thread* that forked the child ends, so children are started from the
    supervisor's main loop only. libc is loaded here, before the fork."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def setup() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
            os._exit(1)

    return setup


@dataclass
class _Child:
    spec: ChildSpec
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    last_pid: int | None = None
    started_at: float | None = None
    started_wall: datetime | None = None
    starts: int = 0
    consecutive: int = 0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    backoffs: list[float] = field(default_factory=list)
    last_exit: int | None = None
    last_exit_wall: datetime | None = None
    state: str = "starting"
    stop_result: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines the child's latest run wrote to its log (empty when it cannot be read);
    the supervisor's header lines only when that run wrote nothing."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16_384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    written = [line for line in text.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(written) if line.startswith(_LOG_HEADER)]
    last_run = written[starts[-1] + 1 :] if starts else written
    return (last_run or written)[-lines:]


# --- the supervisor ------------------------------------------------------------------------------


class Supervisor:
    """Start ``children``, keep them running, stop them on a signal; see the module docstring.

    :meth:`run` installs the signal handlers (call it from the main thread) and returns the exit code:
    0 after a requested stop, 1 when a child crash-looped or ``before_stop`` reported a failure."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        state_dir: Path,
        policy: RestartPolicy | None = None,
        before_stop: Callable[[], bool] | None = None,
        say: Say = _say_stderr,
        config_file: str | None = None,
        poll_interval: float = 0.1,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = _wall_clock,
        env: Mapping[str, str] | None = None,
    ) -> None:
        names = [c.name for c in children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        if not children:
            raise ValueError("nothing to supervise")
        self.state_dir = Path(state_dir)
        self.policy = policy or RestartPolicy()
        self._before_stop = before_stop
        self._say = say
        self._config_file = config_file
        self._poll = poll_interval
        self._monotonic = monotonic
        self._clock = clock
        self._env = dict(os.environ if env is None else env)
        self._children = [_Child(spec, self.state_dir / LOG_DIR / f"{spec.name}.log") for spec in children]
        self._stop_reason: str | None = None
        self._failure: str | None = None
        self._started_wall: datetime | None = None
        self._lock: IO[bytes] | None = None
        self._state = "starting"
        self._run_id = uuid.uuid4().hex[:12]

    # --- public ---------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason

    @property
    def failure(self) -> str | None:
        """Why the supervisor gave up (a crash loop), or ``None``."""
        return self._failure

    def run(self) -> int:
        (self.state_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        previous = self._install_signals()
        try:
            self._started_wall = self._clock()
            self._state = "running"
            self._say(f"supervisor {os.getpid()}: starting {', '.join(c.name for c in self._children)}")
            for child in self._children:
                if self._stop_reason is None:
                    self._start(child)
            self._write_state()
            self._loop()
            return self._shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release_lock()

    # --- loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._stop_reason is None and self._failure is None:
            now = self._monotonic()
            changed = False
            for child in self._children:
                if child.proc is not None:
                    code = child.proc.poll()
                    if code is not None:
                        self._on_exit(child, code, now)
                        changed = True
                        if self._failure is not None:
                            break
                elif child.restart_at is not None and now >= child.restart_at:
                    self._start(child)
                    changed = True
            if changed:
                self._write_state()
            if self._stop_reason is None and self._failure is None:
                time.sleep(self._poll)  # a signal handler sets _stop_reason; the wait is at most one poll

    def _on_exit(self, child: _Child, code: int, now: float) -> None:
        ran = now - (child.started_at or now)
        child.proc = None
        child.last_exit = code
        child.last_exit_wall = self._clock()
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - self.policy.window_s:
            child.crashes.popleft()
        how = describe_exit(code)
        if len(child.crashes) >= self.policy.max_crashes:
            child.state = "failed"
            tail = log_tail(child.log_path)
            self._failure = (
                f"{child.name} crashed {len(child.crashes)} times within {self.policy.window_s:g}s "
                f"(last: {how} after {ran:.1f}s); giving up and stopping everything. Log: {child.log_path}"
                + ("".join(f"\n  | {line}" for line in tail) if tail else "")
            )
            self._say(f"FAILED: {self._failure}")
            return
        child.consecutive = 1 if ran >= self.policy.stable_after_s else child.consecutive + 1
        delay = self.policy.backoff(child.consecutive)
        child.backoffs.append(delay)
        child.restart_at = now + delay
        child.state = "backoff"
        self._say(f"{child.name} exited unexpectedly ({how} after {ran:.1f}s); restarting in {delay:g}s")

    def _start(self, child: _Child) -> None:
        child.restart_at = None
        child.starts += 1
        env = {**self._env, **child.spec.env}
        with child.log_path.open("ab") as log:
            stamp = _iso(self._clock())
            log.write(f"{_LOG_HEADER} {stamp}: start #{child.starts}: {' '.join(child.spec.argv)}\n".encode())
            log.flush()
            try:
                child.proc = subprocess.Popen(
                    list(child.spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    process_group=0,
                    preexec_fn=_die_with_parent(os.getpid()),  # from the main loop only: see _die_with_parent
                )
            except OSError as exc:
                log.write(f"{_LOG_HEADER}: cannot start: {exc}\n".encode())
                child.proc = None
                self._say(f"{child.name}: cannot start: {exc}")
                self._on_exit(child, 127, self._monotonic())
                return
        child.last_pid = child.proc.pid
        child.started_at = self._monotonic()
        child.started_wall = self._clock()
        child.state = "running"
        self._say(f"{child.name} started (pid {child.proc.pid}), log {child.log_path}")

    # --- stop -----------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        code = 0 if self._failure is None else 1
        self._state = "stopping"
        self._write_state()
        reason = self._stop_reason or "failure"
        self._say(f"stopping ({reason})")
        if self._before_stop is not None:
            try:
                if not self._before_stop():
                    code = 1
            except Exception as exc:  # the children must still be stopped; the failure is reported
                self._say(f"before-stop step failed: {type(exc).__name__}: {exc}")
                code = 1
        self._stop_children()
        self._state = "failed" if self._failure is not None else "stopped"
        self._write_state()
        if self._failure is not None:
            self._say(f"stopped after a failure: {self._failure.splitlines()[0]}")
        else:
            self._say("stopped")
        return code

    def _stop_children(self) -> None:
        deadline_s = self.policy.stop_deadline_s
        running = [c for c in self._children if c.alive()]
        for child in self._children:
            child.restart_at = None
            if not child.alive():
                child.state = "stopped" if child.state != "failed" else child.state
        for child in running:
            child.state = "stopping"
            self._signal_group(child, signal.SIGTERM)
        self._write_state()
        end = self._monotonic() + deadline_s
        while any(c.alive() for c in running) and self._monotonic() < end:
            time.sleep(0.05)
        for child in running:
            assert child.proc is not None
            if child.proc.poll() is None:
                self._say(f"{child.name} did not stop within {deadline_s:g}s: killed (SIGKILL)")
                self._signal_group(child, signal.SIGKILL)
                child.stop_result = "killed"
            else:
                child.stop_result = "stopped"
            child.last_exit = child.proc.wait()
            child.last_exit_wall = self._clock()
            child.proc = None
            child.state = "stopped"

    @staticmethod
    def _signal_group(child: _Child, sig: signal.Signals) -> None:
        assert child.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, sig)  # the child leads its own group (process_group=0)

    # --- signals, lock, state --------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def _acquire_lock(self) -> None:
        path = self.state_dir / LOCK_FILE
        handle = path.open("a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            other = read_state(self.state_dir)
            pid = other.get("pid") if other else None
            raise SupervisorError(
                f"another supervisor (pid {pid}) runs this deployment ({self.state_dir}); stop it first"
            ) from None
        self._lock = handle

    def _release_lock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "run_id": self._run_id,
            "pid": os.getpid(),
            "state": self._state,
            "config": self._config_file,
            "started_at": _iso(self._started_wall),
            "updated_at": _iso(self._clock()),
            "failure": self._failure,
            "children": [
                {
                    "name": c.name,
                    "argv": list(c.spec.argv),
                    "pid": None if c.proc is None else c.proc.pid,
                    "last_pid": c.last_pid,
                    "state": c.state,
                    "starts": c.starts,
                    "restarts": max(c.starts - 1, 0),
                    "backoffs_s": list(c.backoffs),
                    "started_at": _iso(c.started_wall),
                    "last_exit": c.last_exit,
                    "last_exit_text": None if c.last_exit is None else describe_exit(c.last_exit),
                    "last_exit_at": _iso(c.last_exit_wall),
                    "stop_result": c.stop_result,
                    "log": str(c.log_path),
                }
                for c in self._children
            ],
        }

    def _write_state(self) -> None:
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, path)


# --- reading the state (``meltica live status``) -----------------------------------------------------


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The last state the supervisor wrote, or ``None``."""
    try:
        data = json.loads((Path(state_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def supervisor_running(state_dir: Path) -> bool:
    """Whether a supervisor holds the deployment's lock right now."""
    path = Path(state_dir) / LOCK_FILE
    if not path.exists():
        return False
    with path.open("a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) is all we know
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def supervised_view(state_dir: Path) -> dict[str, Any]:
    """The supervisor and its children as ``meltica live status`` shows them (pids checked now)."""
    state = read_state(state_dir)
    running = supervisor_running(state_dir)
    if state is None:
        return {"state_dir": str(state_dir), "running": running, "state": "never started", "children": []}
    children = []
    for child in state.get("children", []):
        pid = child.get("pid")
        alive = running and pid_alive(pid)
        children.append({**child, "running": alive, "pid": pid if alive else None})
    return {
        "state_dir": str(state_dir),
        "running": running,
        "pid": state.get("pid") if running else None,
        "state": state.get("state") if running else f"not running (last: {state.get('state')})",
        "started_at": state.get("started_at"),
        "updated_at": state.get("updated_at"),
        "failure": state.get("failure"),
        "children": children,
    }


# --- before the children start --------------------------------------------------------------------


def kafka_bootstrap(settings: MelticaSettings) -> str:
    """``kafka.bootstrap_servers``, else ``MELTICA_KAFKA_BOOTSTRAP``, else the local dev broker."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers

    return default_bootstrap()


def database_url_of(settings: MelticaSettings) -> str:
    """``database_url`` of the deployment's settings (resolved), else the runtime role on the local server
    (``meltica infra``)."""
    if settings.database_url is not None:
        return resolve_secret(settings.database_url, allow_plaintext=True).get_secret_value()

    return ensure_postgres().runtime_url


def prepare_deployment(settings: MelticaSettings, *, source: str, engine: Engine, bootstrap: str, say: Say) -> None:
    """What ``live start`` does before any child starts: ``check_live`` (``ConfigurationError`` naming every
    problem), the database schema at head (in staging and prod it must already be: ``SchemaNotAtHeadError``
    naming ``meltica db upgrade``; in dev and paper it is migrated as the owner role), the deployment's
    topics created with its prefix."""
    check_live(settings, source)
    migrated = ensure_schema_at_head(engine, settings)
    say(f"database {'migrated to' if migrated else 'schema at'} {migrate.current_revision(engine)}")
    catalogue = Catalogue(prefix=settings.live.topic_prefix)
    created = create_topics(bootstrap, catalogue)
    say(
        f"topics with prefix {catalogue.prefix!r} on {bootstrap}: "
        f"{len(created.created)} created, {len(created.existing)} already there"
    )


# --- cancel all on stop ----------------------------------------------------------------------------


def traded_accounts(settings: MelticaSettings) -> list[str]:
    """The accounts the deployment's strategy instances trade on."""
    return sorted({instance.account for instance in settings.live.instances})


def publish_control(bootstrap: str, topic: str, key: str, value: bytes, *, timeout_s: float = 10.0) -> str:
    """Send one record to ``topic`` and wait for the broker's acknowledgement; ``InfrastructureError`` when
    the topic does not exist (it is never auto-created here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3 read_text on import
        # lazy: kafka-python (about 0.4 s) only when a kill-switch command is sent
        from kafka import KafkaProducer

    timeout_ms = int(timeout_s * 1000)
    admin = admin_client(bootstrap, timeout_ms)
    try:
        if topic not in set(admin.list_topics()):
            raise InfrastructureError(f"no topic {topic} on {bootstrap}", reason="topic_missing")
    finally:
        admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="meltica-live",
        acks="all",
        allow_auto_create_topics=False,
        max_block_ms=timeout_ms,
        request_timeout_ms=timeout_ms,
    )
    try:
        sent = producer.send(topic, key=key.encode(), value=value).get(timeout=timeout_s)
    finally:
        producer.close(timeout=timeout_s)
    return f"partition {sent.partition}, offset {sent.offset}"


class CancelAllOnStop:
    """The ``before_stop`` step of ``live start --cancel-all-on-stop``: a ``KillSwitchCommand`` (halt,
    ``account:<name>``) per traded account on the deployment's control topic, so each execution stage
    cancels the account's orders through its OMS; then wait until the database shows none of them open.

    The command goes on the topic only: the persisted kill switch is left as it is, so the next
    ``live start`` trades again. Returns ``False`` (the supervisor then exits non-zero) when the
    command could not be published or orders are still open at the deadline; both are said loudly."""

    def __init__(
        self,
        settings: MelticaSettings,
        engine: Engine,
        bootstrap: str,
        *,
        deadline_s: float = 30.0,
        say: Say = _say_stderr,
        clock: Callable[[], datetime] = _wall_clock,
        monotonic: Callable[[], float] = time.monotonic,
        poll_s: float = 0.25,
    ) -> None:
        self.accounts = traded_accounts(settings)
        self._prefix = settings.live.topic_prefix
        self._engine = engine
        self._bootstrap = bootstrap
        self._deadline_s = deadline_s
        self._say = say
        self._clock = clock
        self._monotonic = monotonic
        self._poll_s = poll_s

    def commands(self) -> Iterator[tuple[str, bytes]]:
        codec = Codec(Catalogue(prefix=self._prefix))
        for account in self.accounts:
            scope = f"account:{account}"
            command = KillSwitchCommand(
                command_id=f"live-stop-{uuid.uuid4().hex}",
                actor="meltica live",
                ts=self._clock(),
                scope=scope,
                mode="halt",
                reason="live stop: cancel all",
            )
            yield scope, codec.encode("control", command)

    def __call__(self) -> bool:
        if not self.accounts:
            return True
        topic = Catalogue(prefix=self._prefix).topic_name("control")
        try:
            for scope, value in self.commands():
                where = publish_control(self._bootstrap, topic, scope, value)
                self._say(f"cancel all: halt {scope} sent on {topic} ({where})")
        except Exception as exc:
            self._say(
                f"CANCEL ALL FAILED: cannot publish the halt on {topic} at {self._bootstrap}: "
                f"{type(exc).__name__}: {exc}; orders may stay open on the venue"
            )
            return False
        end = self._monotonic() + self._deadline_s
        remaining = open_orders(self._engine, self.accounts)
        while remaining and self._monotonic() < end:
            time.sleep(self._poll_s)
            remaining = open_orders(self._engine, self.accounts)
        if not remaining:
            self._say(f"cancel all: no open order left on {', '.join(self.accounts)}")
            return True
        self._say(f"CANCEL ALL INCOMPLETE: {len(remaining)} order(s) still open after {self._deadline_s:g}s:")
        for row in remaining:
            self._say(
                f"  {row['account']} {row['symbol']} {row['side']} {row['quantity']} @ {row['price']} "
                f"{row['status']} client id {row['client_order_id']} venue id {row['exchange_order_id']}"
            )
        return False


__all__ = [
    "CancelAllOnStop",
    "ChildSpec",
    "RestartPolicy",
    "Supervisor",
    "SupervisorError",
    "child_environment",
    "database_url_of",
    "deployment_children",
    "kafka_bootstrap",
    "prepare_deployment",
    "read_state",
    "state_dir_of",
    "supervised_view",
    "traded_accounts",
]

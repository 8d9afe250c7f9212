"""A child process of a test (a stream worker, ``meltica live sinks``…) with its output in a log file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_environment(
    *,
    pythonpath: Iterable[Path] = (),
    set_vars: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
    drop_prefixes: tuple[str, ...] = (),
) -> dict[str, str]:
    """This process's environment for a child: the checkout (and ``pythonpath``) first on ``PYTHONPATH``,
    ``drop``/``drop_prefixes`` removed (settings the child must take from its file), ``set_vars`` added."""
    dropped = set(drop)
    env = {
        k: v for k, v in os.environ.items() if k not in dropped and not (drop_prefixes and k.startswith(drop_prefixes))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, pythonpath), str(REPO), env.get("PYTHONPATH")]))
    env.update(set_vars or {})
    return env


class LoggedProcess:
    """``args`` started in the checkout, stdout and stderr appended to ``log``.

    Reading: :meth:`output`, :meth:`says` (which fails at once, with the log, when the process died without
    saying it). Ending: :meth:`terminate` (SIGTERM, its exit code), :meth:`stop` (SIGTERM, then SIGKILL past
    the timeout; closes the log), :meth:`kill` (SIGKILL), :meth:`close` (SIGKILL if still running)."""

    def __init__(self, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.args = list(args)
        self.log = log
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            self.args,
            cwd=REPO,
            env=dict(env) if env is not None else child_environment(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def says(self, needle: str) -> bool:
        """Whether the log holds ``needle``; a process that exited without saying it fails with its log."""
        if self.process.poll() is not None and needle not in self.output():
            raise AssertionError(f"{self.log.name}: exited {self.process.returncode}:\n{self.output()[-5000:]}")
        return needle in self.output()

    async def until_says(self, needle: str, timeout: float = 90) -> None:
        """Wait (the event loop running) until the log holds ``needle``."""
        deadline = time.monotonic() + timeout
        while not self.says(needle):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.log.name}: not within {timeout:g} s: {needle!r}\n{self.output()[-5000:]}")
            await asyncio.sleep(0.1)

    async def exit_code(self, timeout: float = 90) -> int:
        """Wait (the event loop running) until the process exits by itself."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.log.name}: did not exit within {timeout:g} s:\n{self.output()[-5000:]}")
            await asyncio.sleep(0.1)
        return int(self.process.returncode)

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log_file.close()
        return int(self.process.returncode)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log_file.close()

    def dump_stacks(self, done_marker: str, timeout: float = 10) -> None:
        """Ask a stream worker for its tasks' stacks (SIGUSR1) and wait until it wrote ``done_marker``; a
        worker too stuck to answer leaves its log as it is."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ProcessLookupError):
            while done_marker not in self.output() and time.monotonic() < deadline:
                time.sleep(0.1)

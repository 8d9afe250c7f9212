"""Normal output says each thing once: a kill-switch change is printed once, not also logged."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from sqlalchemy import Engine

pytestmark = pytest.mark.integration


def test_a_kill_switch_change_is_said_once(fresh_database: Engine, unique_name: Callable[[str], str]) -> None:
    env = {
        **os.environ,
        "MELTICA_DATABASE_URL": fresh_database.url.render_as_string(hide_password=False),
        "MELTICA_TOPIC_PREFIX": unique_name("quiet") + ".",  # no control topic: no running pipeline is told
        "COLUMNS": "250",
    }
    for args, change in ((["on", "--reason", "drill"], "off → halt"), (["off", "--reason", "done"], "halt → off")):
        proc = subprocess.run(
            [sys.executable, "-m", "meltica", "kill", *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert (proc.stdout + proc.stderr).count(change) == 1, proc.stdout + proc.stderr

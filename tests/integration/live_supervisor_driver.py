"""Runs a ``meltica.live.supervisor.Supervisor`` over stand-in children, for ``test_live_supervisor.py``.

    python live_supervisor_driver.py '{"state_dir": ..., "children": [{"name": ..., "argv": [...]}],
                                       "policy": {...RestartPolicy fields...}, "settings": FILE}'

With ``settings`` the children get ``child_environment`` of that deployment file, as ``meltica live start``
gives them; without, the driver's whole environment.

Exits with the supervisor's exit code; its messages go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from meltica.config import load_settings
from meltica.live.supervisor import ChildSpec, RestartPolicy, Supervisor, child_environment


def main(spec: dict[str, object]) -> int:
    children = [ChildSpec(c["name"], tuple(c["argv"])) for c in spec["children"]]  # type: ignore[attr-defined]
    policy = RestartPolicy(**spec.get("policy", {}))  # type: ignore[arg-type]
    env = None
    if spec.get("settings"):
        settings_file = str(spec["settings"])
        env = child_environment(load_settings(config_file=settings_file), settings_file)
    state_dir = Path(str(spec["state_dir"]))
    return Supervisor(children, state_dir=state_dir, policy=policy, poll_interval=0.05, env=env).run()


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))

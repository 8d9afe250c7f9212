"""A stand-in for a live deployment's process in the supervisor tests (``test_live_supervisor.py``).

python live_standin_child.py serve NAME                 # runs until SIGTERM, then exits 0
python live_standin_child.py crash NAME CODE            # exits CODE at once
python live_standin_child.py crash-times NAME FILE N    # the first N starts exit 3, later ones serve
python live_standin_child.py stubborn NAME              # ignores SIGTERM (only SIGKILL ends it)
python live_standin_child.py print-env NAME             # prints its environment (one JSON line), then serves
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _serve(name: str) -> None:
    def stop(_signum: int, _frame: object) -> None:
        print(f"{name} got SIGTERM", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"{name} up pid {os.getpid()}", flush=True)
    while True:
        signal.pause()


def main(argv: list[str]) -> None:
    mode, name = argv[0], argv[1]
    if mode == "serve":
        _serve(name)
    elif mode == "print-env":
        print("ENV " + json.dumps(dict(os.environ), sort_keys=True), flush=True)
        _serve(name)
    elif mode == "crash":
        print(f"{name} crashing on purpose", flush=True)
        sys.exit(int(argv[2]))
    elif mode == "crash-times":
        counter, limit = Path(argv[2]), int(argv[3])
        count = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(count))
        if count <= limit:
            print(f"{name} crashing, start {count}", flush=True)
            sys.exit(3)
        _serve(name)
    elif mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"{name} up pid {os.getpid()} (ignores SIGTERM)", flush=True)
        while True:
            signal.pause()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])

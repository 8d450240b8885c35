"""A stand-in for the Elixir VM: spawns a worker, starts training, then waits to be killed."""

from __future__ import annotations

import json
import sys
import time

from uff_port.client import WorkerClient

runs_root, overrides = sys.argv[1], json.loads(sys.argv[2])
client = WorkerClient(runs_root=runs_root, heartbeat_interval=0.5)
client.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": overrides})
client.wait_event("progress", timeout=120)
import psutil  # noqa: E402

children = [p.pid for p in psutil.Process(client.pid).children(recursive=True)]
print(json.dumps({"worker": client.pid, "children": children}), flush=True)
time.sleep(3600)

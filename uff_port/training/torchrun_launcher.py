"""Thin launcher for `distributed.nproc > 1`: torchrun as a child, the channel relayed.

The worker always starts `python -m uff_port.training`; with nproc > 1 that
process becomes this launcher. torchrun's workers cannot inherit the worker's
channel fd (torchrun closes inherited descriptors), so rank 0 connects to a
Unix socket named in an environment variable and the launcher copies bytes
between it and the channel, both ways, unchanged.

Stopping: SIGTERM/SIGINT and channel EOF both become EOF on rank 0's socket,
which every rank then agrees on at the next step boundary (checkpoint, exit
75). torchrun runs in its own session so that a signal to our process group
reaches only us: torchrun's own SIGTERM handling kills workers after 30 s,
which may be less than a checkpoint needs.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Final

from uff_port.core.config import Config
from uff_port.procutil import SignalSafeEvent, set_parent_death_signal, stop_signals
from uff_port.training.reporting import Reporter

_CHUNK: Final = 1 << 16


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_dies_with_us() -> None:
    # Runs in the child between fork and exec: torchrun dies with us, never orphaned.
    set_parent_death_signal(signal.SIGTERM)


class Relay:
    """Copies bytes between the worker's fd and rank 0's socket until either side ends.

    Only the relay thread touches the socket. `request_close` is what signal
    handlers call: it sets a flag and takes no lock, so a second signal
    arriving inside the first handler cannot deadlock the launcher.
    """

    def __init__(self, listener: socket.socket, control_fd: int | None) -> None:
        self.listener = listener
        self.control_fd = control_fd
        self.conn: socket.socket | None = None
        self.closed = SignalSafeEvent()
        self._shut = False

    def request_close(self) -> None:
        """EOF to rank 0 (it checkpoints and all ranks stop), within one relay tick."""
        self.closed.set()

    def _shut_downstream(self) -> None:
        if self.conn is not None and not self._shut:
            self._shut = True
            try:
                self.conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def run(self, proc: subprocess.Popen[bytes]) -> None:
        self.listener.settimeout(0.2)
        while proc.poll() is None:
            try:
                conn, _ = self.listener.accept()
                break
            except TimeoutError:
                continue
        else:
            return
        self.conn = conn
        cfd = conn.fileno()
        fds = [cfd] + ([self.control_fd] if self.control_fd is not None else [])
        # Until rank 0's end closes (it exits): its last frames must still reach the worker.
        while cfd in fds:
            if self.closed.is_set():
                self._shut_downstream()
            ready, _, _ = select.select(fds, [], [], 0.2)
            for fd in ready:
                try:
                    data = os.read(fd, _CHUNK)
                except OSError:
                    data = b""
                if fd == cfd:
                    if not data:
                        fds.remove(fd)
                        continue
                    if self.control_fd is not None:
                        _write_all(self.control_fd, data)
                else:
                    if not data:  # the worker is gone: same as SIGTERM
                        fds.remove(fd)
                        self.request_close()
                        self._shut_downstream()
                        continue
                    if not self.closed.is_set():
                        conn.sendall(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError:
            return
        view = view[n:]


def _node_args(cfg: Config) -> list[str]:
    """torchrun's static multi-node rendezvous: node 0's address and port, this node's rank."""
    d = cfg.distributed
    if d.nnodes <= 1:
        return []
    node_rank = d.node_rank if d.node_rank is not None else int(os.environ.get("UFF_PORT_NODE_RANK", "0"))
    addr = d.master_addr or os.environ.get("UFF_PORT_MASTER_ADDR", "127.0.0.1")
    return ["--nnodes", str(d.nnodes), "--node-rank", str(node_rank), "--master-addr", addr]


def launch(argv: list[str], cfg: Config, control_fd: int | None, report: Reporter) -> int:
    """Run torchrun with our own entry on every rank; return rank 0's exit code."""
    nproc = cfg.distributed.nproc
    port = cfg.distributed.master_port or _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="uff-port-launch-"))
    sock_path = tmp / "channel.sock"
    exit_file = tmp / "exit"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    env = dict(os.environ)
    env.update({"UFF_PORT_CHANNEL_SOCKET": str(sock_path), "UFF_PORT_EXIT_FILE": str(exit_file)})
    if cfg.training.device != "cuda":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    nodes = _node_args(cfg)
    node0 = not nodes or nodes[nodes.index("--node-rank") + 1] == "0"
    if nodes and cfg.distributed.master_port is None and not os.environ.get("UFF_PORT_MASTER_PORT"):
        report.emit("log", level="warning", message="distributed.nnodes > 1 without distributed.master_port: "
                    "every node must be given the same port")
    if nodes:
        port = cfg.distributed.master_port or int(os.environ.get("UFF_PORT_MASTER_PORT", "29500"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        *(nodes or ["--master-addr", "127.0.0.1"]),
        "--master-port", str(port),
        "--max-restarts", "0",
        "-m", "uff_port.training", *argv,
    ]  # fmt: skip
    report.emit("log", level="info", message=f"launching {nproc} processes with torchrun (port {port})")
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_torchrun_dies_with_us, start_new_session=True)
    relay = Relay(listener, control_fd)
    saved: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        relay.request_close()
        if relay.conn is None:  # rank 0 not listening yet: nothing to checkpoint
            proc.send_signal(signal.SIGTERM)

    for sig in stop_signals():  # SIGHUP too: an SSH drop checkpoints like a SIGTERM
        saved[sig] = signal.signal(sig, on_signal)
    thread = threading.Thread(target=relay.run, args=(proc,), name="channel-relay", daemon=True)
    thread.start()
    try:
        rc = proc.wait()
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)
        thread.join(timeout=10.0)
        listener.close()
    # torchrun turns any non-zero worker exit into its own 1: rank 0's code says more.
    try:
        code = int(exit_file.read_text().strip())
    except (OSError, ValueError):
        # Only node 0 holds rank 0 (and its exit file); another node's torchrun status is its answer.
        code = rc if rc != 0 or not node0 else 1
    if rc == 0:
        code = 0 if code == 0 else code
    for p in (sock_path, exit_file):
        p.unlink(missing_ok=True)
    tmp.rmdir()
    return code

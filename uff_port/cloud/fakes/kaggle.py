"""A stand-in for the Kaggle API that runs kernels as real local processes.

Used by tests, by `scripts/simulate_week.py` and by the worker when
`UFF_PORT_CLOUD_FAKE=<state dir>` is set, so the whole path (bundle, dataset
version, generated kernel script, entry point, trainer, paged download,
verification) runs for real, offline. Method names and signatures follow
`kaggle.api.kaggle_api_extended.KaggleApi`.

All state lives in files under the state directory, so a worker that is
killed and restarted sees the same "remote" kernels. Faults are read from
`faults.json` there on every call:

- `outage`: [start, end] unix seconds during which every call raises a
  connection error (the clock is injectable for fake-time tests);
- `status_errors`: the next N calls of `kernels_status` fail transiently;
- `tamper`: `alter` | `truncate` | `extra` | `missing`, applied to the next download;
- `old_status_format`: answer `kernels_status` with the old `{"status": "running"}` dict;
- `page_size`: files per `kernels_output` page (default 3);
- `kill_after`: hard session limit in seconds (SIGKILL), like Kaggle's 12 h.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

from uff_port.fsutil import atomic_write_json

FAKE_ENV: Final = "UFF_PORT_CLOUD_FAKE"
FAKE_USER: Final = "tester"
_WRAPPER: Final = (
    "import os, subprocess, sys\n"
    "rc = subprocess.call([sys.executable, sys.argv[1]])\n"
    "tmp = sys.argv[2] + '.tmp'\n"
    "open(tmp, 'w').write(str(rc))\n"
    "os.replace(tmp, sys.argv[2])\n"
)


def kill_tree(pid: int) -> None:
    """SIGKILL a session and everything it started (the trainer runs in its own group)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class KernelWorkerStatus(enum.Enum):
    """Mirrors the new client's enum: `str()` gives `KernelWorkerStatus.RUNNING`."""

    QUEUED = 0
    RUNNING = 1
    COMPLETE = 2
    ERROR = 3
    CANCEL_REQUESTED = 4
    CANCEL_ACKNOWLEDGED = 5
    NEW_SCRIPT = 6


class FakeHttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class FakeConnectionError(ConnectionError):
    """What requests raises when the provider is unreachable (no HTTP status)."""


class FakeKaggleApi:
    def __init__(self, state_dir: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.calls: list[str] = []

    # ---- faults -------------------------------------------------------------
    def _faults(self) -> dict[str, Any]:
        path = self.root / "faults.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def set_faults(self, **faults: Any) -> None:
        merged = {**self._faults(), **faults}
        atomic_write_json(self.root / "faults.json", merged)

    def _enter(self, name: str) -> dict[str, Any]:
        self.calls.append(name)
        faults = self._faults()
        outage = faults.get("outage")
        if outage and outage[0] <= self.clock() < outage[1]:
            raise FakeConnectionError("Connection reset by peer")
        return faults

    # ---- account ------------------------------------------------------------
    def authenticate(self) -> None:
        return None

    def get_config_value(self, name: str) -> str | None:
        return FAKE_USER if name == "username" else None

    # ---- datasets -----------------------------------------------------------
    def _dataset_dir(self, ref: str) -> Path:
        owner, _, slug = ref.partition("/")
        if owner != FAKE_USER or not slug:
            raise FakeHttpError(403, f"no access to {ref}")
        return self.root / "datasets" / slug

    def _store_dataset(self, folder: str, new: bool) -> None:
        meta = json.loads((Path(folder) / "dataset-metadata.json").read_text(encoding="utf-8"))
        target = self._dataset_dir(meta["id"])
        if new and target.exists():
            raise FakeHttpError(409, "dataset already exists")
        if not new and not target.exists():
            raise FakeHttpError(404, "dataset not found")
        versions = sorted(int(p.name[1:]) for p in target.glob("v*")) if target.exists() else []
        dest = target / f"v{(versions[-1] + 1) if versions else 1}"
        dest.mkdir(parents=True)
        for item in Path(folder).iterdir():
            # dir_mode='skip': subdirectories are not uploaded, as with the real client.
            if item.is_file() and item.name != "dataset-metadata.json":
                shutil.copyfile(item, dest / item.name)
        uploads = self.root / "uploads.log"
        with open(uploads, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"dataset": meta["id"], "files": sorted(p.name for p in dest.iterdir()),
                                 "bytes": sum(p.stat().st_size for p in dest.iterdir())}) + "\n")

    def uploads(self) -> list[dict[str, Any]]:
        """Every dataset version uploaded (test helper): what travelled, file names and bytes."""
        path = self.root / "uploads.log"
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []

    # ---- models ---------------------------------------------------------------
    def publish_model(self, handle: str, source: str | Path) -> None:
        """Test helper: a Kaggle Model instance version `owner/model/framework/variation/version` exists."""
        dest = self.root / "models" / handle
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(source, dest)

    def dataset_create_new(
        self,
        folder: str,
        public: bool = False,
        quiet: bool = False,
        convert_to_csv: bool = True,
        dir_mode: str = "skip",
        ignore_patterns: list[str] | None = None,
    ) -> SimpleNamespace:
        self._enter("dataset_create_new")
        if public:
            raise FakeHttpError(400, "uff-port datasets must be private")
        self._store_dataset(folder, new=True)
        return SimpleNamespace(error=None, status="ok")

    def dataset_create_version(
        self,
        folder: str,
        version_notes: str,
        quiet: bool = False,
        convert_to_csv: bool = True,
        delete_old_versions: bool = False,
        dir_mode: str = "skip",
        ignore_patterns: list[str] | None = None,
    ) -> SimpleNamespace:
        self._enter("dataset_create_version")
        self._store_dataset(folder, new=False)
        return SimpleNamespace(error=None, status="ok")

    def dataset_status(self, dataset: str, format: str | None = None) -> str:  # noqa: A002 - the client's name
        self._enter("dataset_status")
        if not self._dataset_dir(dataset).exists():
            raise FakeHttpError(404, "dataset not found")
        return "ready"

    def _latest_dataset(self, ref: str) -> Path:
        target = self._dataset_dir(ref)
        versions = sorted(int(p.name[1:]) for p in target.glob("v*"))
        if not versions:
            raise FakeHttpError(404, f"dataset {ref} not found")
        return target / f"v{versions[-1]}"

    # ---- kernels ------------------------------------------------------------
    def _kernel_dir(self, ref: str) -> Path:
        owner, _, slug = ref.partition("/")
        if owner != FAKE_USER or not slug:
            raise FakeHttpError(403, f"no access to {ref}")
        return self.root / "kernels" / slug

    def _latest_version(self, ref: str) -> Path:
        kdir = self._kernel_dir(ref)
        versions = sorted(int(p.name[1:]) for p in kdir.glob("v*")) if kdir.exists() else []
        if not versions:
            raise FakeHttpError(404, f"kernel {ref} not found")
        return kdir / f"v{versions[-1]}"

    def kernels_push(
        self, folder: str, timeout: str | None = None, acc: str | None = None, no_run: bool = False
    ) -> SimpleNamespace:
        """Checks what the client checks (ValueError) and what the service refuses (an `error` answer)."""
        faults = self._enter("kernels_push")
        meta = json.loads((Path(folder) / "kernel-metadata.json").read_text(encoding="utf-8"))
        for source in meta.get("dataset_sources", []):
            if source.count("/") != 1 or not all(source.split("/")):
                raise ValueError("Dataset must be specified in the form of '{username}/{dataset-slug}'")
        for source in meta.get("model_sources", []):
            parts = source.split("/")
            if len(parts) != 5 or not all(parts):
                raise ValueError(
                    "Model instance version must be specified in the form of "
                    "'{owner}/{model-slug}/{framework}/{instance-slug}/{version-number}'"
                )
            if not parts[4].isdigit():
                raise ValueError("Model instance version's version-number must be an integer")
        if meta.get("is_private") is not True or meta.get("enable_gpu") is not True:
            return SimpleNamespace(error="uff-port kernels must be private GPU kernels", version_number=None)
        missing = [ref for ref in meta.get("dataset_sources", []) if not self._has_dataset(ref)]
        missing += [ref for ref in meta.get("model_sources", []) if not (self.root / "models" / ref).is_dir()]
        if missing:
            # The service refuses a kernel whose data sources do not exist (or are not ours).
            return SimpleNamespace(error=f"Data source(s) not found or not accessible: {', '.join(missing)}",
                                   version_number=None)
        kdir = self._kernel_dir(meta["id"])
        versions = sorted(int(p.name[1:]) for p in kdir.glob("v*")) if kdir.exists() else []
        number = (versions[-1] + 1) if versions else 1
        vdir = kdir / f"v{number}"
        sandbox = vdir / "sandbox"
        (sandbox / "working").mkdir(parents=True)
        for ref in meta.get("dataset_sources", []):
            shutil.copytree(self._latest_dataset(ref), sandbox / "input" / ref.split("/", 1)[1])
        for ref in meta.get("model_sources", []):
            # Mounted as Kaggle does: input/<model>/<framework>/<variation>/<version>.
            _owner, model, framework, variation, version = ref.split("/")
            shutil.copytree(self.root / "models" / ref, sandbox / "input" / model / framework / variation / version)
        source = vdir / meta["code_file"]
        shutil.copyfile(Path(folder) / meta["code_file"], source)
        env = {k: v for k, v in os.environ.items() if k != FAKE_ENV}
        env.update({"UFF_PORT_KAGGLE_ROOT": str(sandbox), "KAGGLE_KERNEL_RUN_TYPE": "Batch"})
        if not meta.get("enable_internet", True):
            env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        with open(vdir / "log.txt", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRAPPER, str(source), str(vdir / "rc")],
                cwd=sandbox / "working",
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        limit = faults.get("kill_after") or (float(timeout) if timeout else None)
        shape = acc or meta.get("machine_shape")
        atomic_write_json(vdir / "state.json", {"pid": proc.pid, "pushed": time.time(), "limit": limit,
                                                 "machine_shape": shape, "metadata": meta})
        ref = meta["id"]
        return SimpleNamespace(error=None, version_number=number, versionNumber=number, ref=ref, url=f"fake://{ref}")

    def _has_dataset(self, ref: str) -> bool:
        try:
            return any(self._dataset_dir(ref).glob("v*"))
        except FakeHttpError:
            return False

    def pushed(self, kernel: str) -> dict[str, Any]:
        """Test helper: the latest push's metadata and the machine shape it asked for."""
        return dict(json.loads((self._latest_version(kernel) / "state.json").read_text(encoding="utf-8")))

    def kernels_pull(self, kernel: str, path: str, metadata: bool = False, quiet: bool = True) -> str:
        self._enter("kernels_pull")
        vdir = self._latest_version(kernel)
        out = Path(path or ".")
        out.mkdir(parents=True, exist_ok=True)
        for src in vdir.glob("*.py"):
            shutil.copyfile(src, out / src.name)
        return str(out)

    def kill(self, kernel: str) -> None:
        """The provider pulls the plug (a hard session cut-off)."""
        vdir = self._latest_version(kernel)
        state = json.loads((vdir / "state.json").read_text(encoding="utf-8"))
        kill_tree(state["pid"])
        if not (vdir / "rc").exists():
            (vdir / "rc").write_text("-9", encoding="utf-8")

    def _rc(self, vdir: Path) -> int | None:
        rc_file = vdir / "rc"
        if rc_file.is_file():
            return int(rc_file.read_text(encoding="utf-8") or "1")
        state = json.loads((vdir / "state.json").read_text(encoding="utf-8"))
        if state.get("limit") and time.time() - state["pushed"] > float(state["limit"]):
            self.kill(f"{FAKE_USER}/{vdir.parent.name}")
            return -9
        try:
            os.waitpid(state["pid"], os.WNOHANG)  # reap if it is our child
        except ChildProcessError:
            pass
        return None

    def kernels_status(self, kernel: str) -> Any:
        faults = self._enter("kernels_status")
        if faults.get("status_errors", 0) > 0:
            self.set_faults(status_errors=faults["status_errors"] - 1)
            raise FakeHttpError(503, "Service Unavailable")
        vdir = self._latest_version(kernel)
        rc = self._rc(vdir)
        if rc is None:
            status, message = KernelWorkerStatus.RUNNING, ""
        elif rc == 0:
            status, message = KernelWorkerStatus.COMPLETE, ""
        else:
            status, message = KernelWorkerStatus.ERROR, f"kernel exited {rc}"
        if faults.get("old_status_format"):
            return {"status": status.name.lower(), "failureMessage": message}
        return SimpleNamespace(status=status, failure_message=message)

    def kernels_output(
        self,
        kernel: str,
        path: str,
        file_pattern: str | None = None,
        force: bool = False,
        quiet: bool = True,
        page_token: str | None = None,
        page_size: int = 20,
    ) -> tuple[list[str], str | None]:
        faults = self._enter("kernels_output")
        vdir = self._latest_version(kernel)
        working = vdir / "sandbox" / "working"
        files = sorted(p.relative_to(working).as_posix() for p in working.rglob("*") if p.is_file())
        size = int(faults.get("page_size", 3))
        start = int(page_token or 0)
        page = files[start : start + size]
        out = Path(path)
        written = []
        for rel in page:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(working / rel, target)
            written.append(str(target))
        nxt = str(start + size) if start + size < len(files) else None
        if nxt is None:
            (out / f"{vdir.parent.name}.log").write_bytes((vdir / "log.txt").read_bytes()[-4096:])
            tamper = faults.get("tamper")
            if tamper:
                self.set_faults(tamper=None)
                _tamper(out, tamper)
        return written, nxt


def _tamper(out: Path, how: str) -> None:
    victims = sorted(p for p in out.rglob("*.safetensors")) or sorted(
        p for p in out.rglob("*") if p.is_file() and p.suffix != ".log" and p.name != "uff-output-manifest.json"
    )
    victim = victims[0]
    if how == "alter":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif how == "truncate":
        victim.write_bytes(victim.read_bytes()[: max(0, victim.stat().st_size // 2)])
    elif how == "missing":
        victim.unlink()
    elif how == "extra":
        (victim.parent / "unexpected.bin").write_bytes(b"not from the session")

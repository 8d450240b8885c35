"""Deploy into a serving directory: atomic switches under a concurrent reader, rollback, hooks, holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from release_fixtures import role_artifacts
from test_registry_fixtures import uff

from uff_port.protocol import CommandError
from uff_port.registry import deploy as dp
from uff_port.registry.manifest import ArtifactManifest
from uff_port.registry.store import Registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[ArtifactManifest]]]:
    base = tmp_path_factory.mktemp("deploy")
    with Registry(base / "reg") as reg:
        arts = {"ufm": role_artifacts(reg, base, "ufm", 4), "ucm": role_artifacts(reg, base, "ucm", 1)}
    return base / "reg", arts


def _read_whole(role_dir: Path) -> str:
    """What an inference host does: resolve `current` once, then read every file of that version."""
    version = Path(os.path.realpath(role_dir / "current"))
    manifest = json.loads((version / "artifact.json").read_text())
    for rel, meta in manifest["files"].items():
        data = (version / rel).read_bytes()
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise AssertionError(f"partial adapter: {version.name[:12]}/{rel}")
    return str(manifest["artifact_id"])


def test_reader_never_sees_a_partial_adapter_and_rollback_restores_the_bytes(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg_dir, arts = world
    ufm = arts["ufm"]
    target = tmp_path / "serve"
    with Registry(reg_dir) as reg:
        dp.deploy(reg, target, {"ufm": ufm[0]})
        seen: dict[str, int] = {}
        errors: list[str] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    aid = _read_whole(target / "ufm")
                    seen[aid] = seen.get(aid, 0) + 1
                except FileNotFoundError:
                    seen["vanished"] = seen.get("vanished", 0) + 1  # a pruned old version: whole or gone
                except AssertionError as exc:
                    errors.append(str(exc))

        def reads() -> int:
            return sum(seen.values())

        def let_it_read() -> None:  # the reader gets a couple of reads in between, however loaded the host
            start = reads()
            for _ in range(2000):
                if reads() >= start + 2:
                    return
                time.sleep(0.005)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(12):
                dp.deploy(reg, target, {"ufm": ufm[(i + 1) % 4]})
                let_it_read()
                if i % 3 == 2:
                    dp.rollback_role(reg, target, "ufm")
                    let_it_read()
        finally:
            stop.set()
            thread.join(30)
        assert errors == [] and sum(v for k, v in seen.items() if k != "vanished") > 12, seen
        assert len({k for k in seen if k != "vanished"}) >= 2  # the reader saw switches happen

        # exactly the previous bytes come back
        serving = dp.ServingDir(target)
        before_prev = serving.link("ufm", "previous")
        assert before_prev is not None
        dp.rollback_role(reg, target, "ufm")
        assert serving.link("ufm", "current") == before_prev
        restored = dp.tree_digest(Path(os.path.realpath(target / "ufm" / "current")))
        registered = dp.tree_digest(reg.artifact_dir(before_prev))
        assert restored == registered
        # the current adapter and the two before it are kept, nothing else
        versions = [p for p in (target / "ufm" / "versions").iterdir()]
        assert len(versions) == 3 and not [p for p in versions if p.name.startswith(".")]


def test_launch_config_hooks_and_holds(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg_dir, arts = world
    target = tmp_path / "serve"
    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeVllm(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, body))
            ok = self.path == "/v1/load_lora_adapter" and Path(body["lora_path"]).is_dir()
            self.send_response(200 if ok or self.path.startswith("/v1/unload") else 400)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_log = tmp_path / "hook.log"
    hooks = dp.ReloadHooks(command=f"sh -c 'echo $UFF_PORT_ROLE $UFF_PORT_ARTIFACT_ID >> {hook_log}'",
                           vllm_url=f"http://127.0.0.1:{server.server_port}")
    try:
        with Registry(reg_dir) as reg:
            ufm, ucm = arts["ufm"], arts["ucm"]
            out = dp.deploy(reg, target, {"ufm": ufm[0], "ucm": ucm[0]}, hooks=hooks)
            launch = json.loads((target / "vllm.json").read_text())
            cmd = launch["command"]
            assert cmd[:3] == ["vllm", "serve", "builtin:tiny-llama"] and "--enable-lora" in cmd
            assert cmd[cmd.index("--max-loras") + 1] == "2" and cmd[cmd.index("--max-lora-rank") + 1] == "16"
            i = cmd.index("--lora-modules")
            assert cmd[i + 1:i + 3] == [f"ucm={target}/ucm/current", f"ufm={target}/ufm/current"]
            assert "--lora-modules ucm=" in (target / "vllm.sh").read_text()
            assert [c[0] for c in calls] == ["/v1/unload_lora_adapter", "/v1/load_lora_adapter"] * 2
            assert calls[1][1] == {"lora_name": "ucm", "lora_path": str(target / "ucm" / "versions" / ucm[0].artifact_id)}
            assert hook_log.read_text().split("\n")[:2] == [f"ucm {ucm[0].artifact_id}", f"ufm {ufm[0].artifact_id}"]
            assert out.reloads and all(r["ok"] for r in out.reloads)

            # the same deploy again moves nothing and calls no hook
            calls.clear()
            again = dp.deploy(reg, target, {"ufm": ufm[0]}, hooks=hooks)
            assert not again.switches[0].changed and calls == []

            # a rollback with hold: the bad release is never redeployed without --unhold
            dp.deploy(reg, target, {"ufm": ufm[1]})
            dp.rollback_role(reg, target, "ufm", hold=True, note={"slo": "latency_p95"})
            with pytest.raises(CommandError) as exc:
                dp.deploy(reg, target, {"ufm": ufm[1]})
            assert exc.value.code == "release_held" and "latency_p95" in exc.value.message
            dp.deploy(reg, target, {"ufm": ufm[1]}, unhold=True)
            assert dp.ServingDir(target).holds() == {}

            # a failing hook: the switch stands, the caller hears reload_failed
            bad = dp.ReloadHooks(command="sh -c 'echo no >&2; exit 3'")
            with pytest.raises(CommandError) as exc:
                dp.deploy(reg, target, {"ufm": ufm[2]}, hooks=bad)
            assert exc.value.code == "reload_failed" and "exited 3" in exc.value.message
            serving = dp.ServingDir(target)
            assert serving.link("ufm", "current") == ufm[2].artifact_id

            # a rollback judged against another adapter than the one serving is refused
            with pytest.raises(CommandError) as exc:
                dp.rollback_role(reg, target, "ufm", expect_current=ufm[1].artifact_id)
            assert exc.value.code == "alias_conflict" and serving.link("ufm", "current") == ufm[2].artifact_id
            # a version damaged on the host is replaced whole when deployed again
            weights = serving.version_dir("ufm", ufm[2].artifact_id) / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-7])
            dp.deploy(reg, target, {"ufm": ufm[2]})
            assert dp.tree_digest(serving.version_dir("ufm", ufm[2].artifact_id)) == dp.tree_digest(
                reg.artifact_dir(ufm[2].artifact_id))
    finally:
        server.shutdown()


def test_cli_deploys_stable_and_a_release(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg_dir, arts = world
    ufm, ucm = arts["ufm"][3], arts["ucm"][0]
    release = {"kind": "uff-port.release", "artifacts": {"ufm": ufm.to_dict(), "ucm": ucm.to_dict()}}
    (tmp_path / "fused.json").write_text(json.dumps(release))
    target = tmp_path / "serve"
    res = uff("deploy", "--registry", str(reg_dir), "--target", str(target), "--release",
              str(tmp_path / "fused.json"), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {r["role"]: r["artifact_id"] for r in out["roles"]} == {"ufm": ufm.artifact_id, "ucm": ucm.artifact_id}
    res = uff("deploy", "--registry", str(reg_dir), "--target", str(target), "--role", "ufm")
    assert res.returncode == 4 and "ufm:stable is not set" in res.stderr  # nothing promoted yet
    swapped = {"kind": "uff-port.release", "artifacts": {"ucm": ufm.to_dict()}}
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    with Registry(reg_dir) as reg, pytest.raises(CommandError) as exc:
        dp.plan_from_release(reg, tmp_path / "swapped.json")
    assert exc.value.code == "inconsistent_release" and "registered as a ufm artifact" in exc.value.message


def test_worker_commands_deploy_and_roll_back(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from uff_port.registry import deploy_commands
    from uff_port.server.extension_child import TaskContext

    reg_dir, arts = world
    runs = tmp_path / "runs"
    runs.mkdir()
    serving_root = tmp_path / "srv"
    monkeypatch.setenv("UFF_PORT_REGISTRY", str(reg_dir))
    monkeypatch.setenv("UFF_PORT_SERVING_ROOT", str(serving_root))
    ctx = TaskContext(runs_root=runs)
    ufm = arts["ufm"]
    for m in ufm[:2]:
        out = deploy_commands.deploy({"target": "host", "roles": [f"ufm={m.artifact_id}"]}, ctx)
    assert out["roles"][0]["artifact_id"] == ufm[1].artifact_id and out["target"] == str(serving_root / "host")
    assert [e["event"] for e in ctx.events] == ["deployed", "deployed"]
    assert ctx.events[-1]["replaced"] == ufm[0].artifact_id
    rolled = deploy_commands.deploy_rollback({"target": "host", "role": "ufm", "hold": True}, ctx)
    assert rolled["restored"] == ufm[0].artifact_id and ctx.events[-1]["event"] == "deploy_rolled_back"
    assert rolled["registry"]["moved"] is False  # the registry never had them as stable
    with pytest.raises(CommandError) as exc:
        deploy_commands.deploy({"target": "host", "roles": [f"ufm={ufm[1].artifact_id}"]}, ctx)
    assert exc.value.code == "release_held"
    for bad, field in (({"target": "../../etc", "roles": ["ufm"]}, "args.target"),
                       ({"target": "host", "roles": "ufm"}, "args.roles"),
                       ({"target": "host"}, "args.roles/args.release")):
        with pytest.raises(CommandError) as exc:
            deploy_commands.deploy(bad, ctx)
        assert exc.value.code == "invalid_args" and field in exc.value.message


def test_deploy_through_the_real_worker(world, runs_root: Path, worker) -> None:  # type: ignore[no-untyped-def]
    reg_dir, arts = world
    release = {"kind": "uff-port.release", "artifacts": {"ucm": arts["ucm"][0].to_dict()}}
    (runs_root / "fused.json").write_text(json.dumps(release))
    shutil.copytree(reg_dir, runs_root / "registry")
    reply = worker.call("deploy", {"target": "serve", "release": "fused.json"}, timeout=120)
    assert reply["ok"], reply
    event = worker.wait_event("deployed", timeout=30)
    assert event["role"] == "ucm" and event["artifact_id"] == arts["ucm"][0].artifact_id
    assert (runs_root / "serve" / "ucm" / "current").is_symlink()
    reply = worker.call("deploy_rollback", {"target": "serve", "role": "ucm"}, timeout=60)
    assert not reply["ok"] and reply["error"]["code"] == "not_found"


def test_six_roles_from_a_federated_release(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """docs/registry.md's worked example: one release of the six manager roles on one vLLM server."""
    from uff_port.registry.federate import federate, write_release

    reg_dir, arts = world
    roles = ("ufm", "ucm", "urm", "ulm", "uim", "uam")
    with Registry(reg_dir) as reg:
        extra = {r: role_artifacts(reg, tmp_path, r, 1)[0] for r in roles[2:]}
        chosen = {"ufm": arts["ufm"][0], "ucm": arts["ucm"][0], **extra}
        inputs = []
        for role, m in chosen.items():
            (tmp_path / f"{role}.json").write_text(m.to_json())
            inputs.append((role, str(tmp_path / f"{role}.json")))
    write_release(federate(inputs, None), tmp_path / "release.json")
    target = tmp_path / "srv"
    res = uff("deploy", "--registry", str(reg_dir), "--target", str(target), "--release", str(tmp_path / "release.json"))
    assert res.returncode == 0, res.stderr
    launch = json.loads((target / "vllm.json").read_text())
    cmd = launch["command"]
    assert cmd[cmd.index("--max-loras") + 1] == "6"
    i = cmd.index("--lora-modules")
    assert cmd[i + 1:i + 7] == [f"{r}={target}/{r}/current" for r in sorted(roles)]
    assert {r: v["artifact_id"] for r, v in launch["roles"].items()} == {r: m.artifact_id for r, m in chosen.items()}
    assert subprocess.run(["sh", "-n", str(target / "vllm.sh")]).returncode == 0
    status = json.loads(uff("deploy", "--target", str(target), "--status").stdout)
    assert sorted(status["roles"]) == sorted(roles) and status["holds"] == {}

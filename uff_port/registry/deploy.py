"""Deploy registered adapters into a serving directory an inference host reads.

Layout (one folder per role; docs/registry.md, "Deploy")::

    TARGET/<role>/versions/<artifact_id>/   the adapter files + artifact.json, never modified
    TARGET/<role>/current  -> versions/<id> what serves (relative symlink)
    TARGET/<role>/previous -> versions/<id> what `rollback` restores
    TARGET/<role>/history.json              every switch, newest last
    TARGET/holds.json                       artifacts rolled back after an SLO breach
    TARGET/vllm.json, TARGET/vllm.sh        the multi-LoRA launch configuration

Why versioned directories and a symlink swap: a version directory is filled
under a temporary name and renamed in whole, and `current` is replaced by
renaming a new symlink over it (`rename(2)` is atomic), so a reader that
resolves `current` once sees one complete adapter, old or new, never a mix or
a half-copied file. Rollback is one more swap: the bytes are still there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import (
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    recover_dir,
    replace_dir,
)
from uff_port.hashing import sha256_file, verify_tree
from uff_port.registry.errors import (
    ALIAS_CONFLICT,
    INCONSISTENT_RELEASE,
    INVALID_ARGS,
    INVALID_MANIFEST,
    NOT_FOUND,
    RELEASE_HELD,
    RELOAD_FAILED,
    VERIFY_FAILED,
    RegistryError,
)
from uff_port.registry.manifest import MANIFEST_NAME, ROLES, ArtifactManifest, load_manifest
from uff_port.registry.store import Registry

KEEP_DEFAULT: Final = 3
"""Version directories kept per role: the current adapter and the two before it."""
LINKS: Final = ("current", "previous")
VLLM_RANKS: Final = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM accepts for --max-lora-rank."""
_HOOK_TIMEOUT_S: Final = 120.0


@dataclass
class Switch:
    """One role's move in a deploy or rollback."""

    role: str
    artifact_id: str
    version: str
    replaced: str | None
    changed: bool
    path: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DeployResult:
    target: str
    switches: list[Switch] = field(default_factory=list)
    launch: dict[str, Any] = field(default_factory=dict)
    reloads: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "roles": [s.to_dict() for s in self.switches],
                "launch": self.launch, "reloads": self.reloads}


class ServingDir:
    """The serving directory; every change happens under one `flock` on TARGET/.deploy.lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    @contextmanager
    def locked(self) -> Iterator[ServingDir]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".deploy.lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file closes
            yield self

    def role_dir(self, role: str) -> Path:
        return self.root / role

    def roles(self) -> list[str]:
        return sorted(r for r in ROLES if (self.root / r / "current").is_symlink())

    def link(self, role: str, name: str) -> str | None:
        """The artifact id a link points at, or None."""
        path = self.role_dir(role) / name
        return Path(os.readlink(path)).name if path.is_symlink() else None

    def version_dir(self, role: str, artifact_id: str) -> Path:
        return self.role_dir(role) / "versions" / artifact_id

    def manifest(self, role: str, artifact_id: str) -> ArtifactManifest:
        return load_manifest(self.version_dir(role, artifact_id) / MANIFEST_NAME)

    # -- holds (flap damping) --------------------------------------------------

    def holds(self) -> dict[str, dict[str, Any]]:
        """{artifact_id: {role, reason, since}}: rolled back after a breach, not redeployed automatically."""
        path = self.root / "holds.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def set_hold(self, artifact_id: str, role: str, reason: dict[str, Any]) -> None:
        holds = self.holds()
        holds[artifact_id] = {"role": role, "since": time.time(), **reason}
        atomic_write_json(self.root / "holds.json", holds)

    def clear_hold(self, artifact_id: str) -> None:
        holds = self.holds()
        if holds.pop(artifact_id, None) is not None:
            atomic_write_json(self.root / "holds.json", holds)

    # -- files -------------------------------------------------------------

    def install(self, role: str, manifest: ArtifactManifest, source: Path) -> Path:
        """Copy an artifact into versions/<id> (temp dir, hash check, fsync, rename); idempotent."""
        final = self.version_dir(role, manifest.artifact_id)
        recover_dir(final)  # a replacement (below) that died mid-swap
        if final.is_dir():
            report = verify_tree(final, manifest.files_dict(), exclude=(MANIFEST_NAME,))
            if report.ok:
                return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            for rel in sorted(manifest.files):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / rel, tmp / rel)
            atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
            report = verify_tree(tmp, manifest.files_dict(), exclude=(MANIFEST_NAME,))
            if not report.ok:
                raise RegistryError(VERIFY_FAILED, f"{role}: copy of {manifest.short_id} differs: "
                                    f"{report.summary()}", {"verify": report.to_dict()})
            fsync_tree(tmp)
            replace_dir(tmp, final)  # a copy damaged on the host is swapped for the good one
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _discard(self, path: Path) -> None:
        """Rename away first, then delete: a reader sees the whole directory or none of it."""
        trash = path.parent / f".trash-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _point(self, role: str, name: str, artifact_id: str | None) -> None:
        link = self.role_dir(role) / name
        if artifact_id is None:
            if link.is_symlink():
                link.unlink()
            return
        tmp = self.role_dir(role) / f".{name}.{uuid.uuid4().hex}"
        os.symlink(f"versions/{artifact_id}", tmp)
        os.replace(tmp, link)  # rename(2) over the old link: atomic

    def switch(self, role: str, artifact_id: str, action: str, keep: int = KEEP_DEFAULT) -> Switch:
        """Point `current` at an installed version; the old current becomes `previous`."""
        old = self.link(role, "current")
        manifest = self.manifest(role, artifact_id)
        path = str(self.version_dir(role, artifact_id))
        if old == artifact_id:
            return Switch(role, artifact_id, manifest.version, self.link(role, "previous"), False, path)
        # previous first: at every instant both links name complete, installed versions
        if old is not None:
            self._point(role, "previous", old)
        self._point(role, "current", artifact_id)
        fsync_dir(self.role_dir(role))
        self._record(role, action, artifact_id, old)
        self._prune(role, keep)
        return Switch(role, artifact_id, manifest.version, old, True, path)

    def rollback(self, role: str) -> Switch:
        """Swap `current` and `previous` (a second rollback rolls forward again)."""
        prev = self.link(role, "previous")
        if prev is None or not self.version_dir(role, prev).is_dir():
            raise RegistryError(NOT_FOUND, f"{role}: the serving directory has no previous version "
                                f"to roll back to (in {self.role_dir(role)})")
        return self.switch(role, prev, "rollback")

    def history(self, role: str) -> list[dict[str, Any]]:
        path = self.role_dir(role) / "history.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    def _record(self, role: str, action: str, new: str, old: str | None) -> None:
        rows = self.history(role)
        rows.append({"ts": time.time(), "action": action, "artifact_id": new, "replaced": old})
        atomic_write_json(self.role_dir(role) / "history.json", rows[-200:])

    def _prune(self, role: str, keep: int) -> None:
        """Keep the last `keep` distinct versions switched to, and whatever a link names."""
        wanted: list[str] = []
        for row in reversed(self.history(role)):
            if row["artifact_id"] not in wanted:
                wanted.append(row["artifact_id"])
        pinned = {self.link(role, n) for n in LINKS} | set(wanted[:max(keep, 2)])
        versions = self.role_dir(role) / "versions"
        for d in versions.iterdir():
            if not d.name.startswith(".") and d.name not in pinned:
                self._discard(d)

    # -- launch configuration -----------------------------------------------

    def write_launch(self, port: int = 8000) -> dict[str, Any]:
        """vllm.json + vllm.sh for every role served here: one base, one LoRA module per role."""
        roles = self.roles()
        if not roles:
            return {}
        manifests = {r: self.manifest(r, self.link(r, "current") or "") for r in roles}
        _agree_base(manifests)
        first = manifests[roles[0]]
        rank = max((m.interface.r or 16) for m in manifests.values())
        max_rank = next((v for v in VLLM_RANKS if v >= rank), rank)
        modules = [f"{r}={self.role_dir(r) / 'current'}" for r in roles]
        args = ["--enable-lora", "--max-loras", str(len(roles)), "--max-lora-rank", str(max_rank),
                "--lora-modules", *modules, "--port", str(port)]
        if first.base_model.revision:
            args[0:0] = ["--revision", first.base_model.revision]
        launch = {
            "engine": "vllm",
            "base_model": first.base_model.id,
            "command": ["vllm", "serve", first.base_model.id, *args],
            "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
            "roles": {r: {"artifact_id": m.artifact_id, "version": m.version,
                          "path": str(self.role_dir(r) / "current")} for r, m in manifests.items()},
        }
        atomic_write_json(self.root / "vllm.json", launch)
        script = ("#!/bin/sh\n# written by `uff-port deploy`; the adapters switch under current/ "
                  "without a restart\nexport VLLM_ALLOW_RUNTIME_LORA_UPDATING=True\nexec "
                  + " ".join(shlex.quote(a) for a in launch["command"]) + ' "$@"\n')
        atomic_write_text(self.root / "vllm.sh", script)
        os.chmod(self.root / "vllm.sh", 0o755)
        return launch


def _agree_base(manifests: dict[str, ArtifactManifest]) -> None:
    bases = {r: (m.base_model.id, m.base_model.revision) for r, m in manifests.items()}
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{r}={b[0]}@{b[1]}" for r, b in sorted(bases.items()))
        raise RegistryError(INCONSISTENT_RELEASE, f"base_model: the roles of one serving directory "
                            f"share one base model ({listing})", {"field": "base_model", "values": bases})


# -- reload hooks ----------------------------------------------------------------


@dataclass
class ReloadHooks:
    """How the inference host learns of a switch: a command, vLLM's runtime LoRA endpoints, or both."""

    command: str | None = None
    vllm_url: str | None = None

    def run(self, switches: list[Switch], target: Path) -> list[dict[str, Any]]:
        done = []
        for s in (s for s in switches if s.changed):
            if self.command:
                done.append(_run_command(self.command, s, target))
            if self.vllm_url:
                done.append(_vllm_reload(self.vllm_url, s))
        return done


def _run_command(command: str, s: Switch, target: Path) -> dict[str, Any]:
    env = {**os.environ, "UFF_PORT_ROLE": s.role, "UFF_PORT_ARTIFACT_ID": s.artifact_id,
           "UFF_PORT_ADAPTER_PATH": s.path, "UFF_PORT_SERVING_DIR": str(target)}
    try:
        proc = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True,
                              timeout=_HOOK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RegistryError(RELOAD_FAILED, f"reload command for {s.role}: {exc}",
                            {"role": s.role, "hook": "command"}) from None
    if proc.returncode != 0:
        raise RegistryError(RELOAD_FAILED, f"reload command for {s.role} exited {proc.returncode}: "
                            f"{proc.stderr.strip()[-500:]}", {"role": s.role, "hook": "command",
                                                               "exit_status": proc.returncode})
    return {"role": s.role, "hook": "command", "ok": True}


def _post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get("VLLM_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=_HOOK_TIMEOUT_S) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def _vllm_reload(base_url: str, s: Switch) -> dict[str, Any]:
    """Unload the role's adapter name (absent is fine), then load the new version's directory.

    vLLM refuses to load a name it already holds, hence the unload; the path
    sent is the version directory itself, so the engine holds those bytes even
    if `current` moves again while it loads.
    """
    base = base_url.rstrip("/")
    try:
        _post(f"{base}/v1/unload_lora_adapter", {"lora_name": s.role})
        status, text = _post(f"{base}/v1/load_lora_adapter", {"lora_name": s.role, "lora_path": s.path})
    except OSError as exc:
        raise RegistryError(RELOAD_FAILED, f"vLLM at {base}: {exc}", {"role": s.role, "hook": "vllm"}) from None
    if status != 200:
        raise RegistryError(RELOAD_FAILED, f"vLLM load_lora_adapter for {s.role}: HTTP {status}: "
                            f"{text.strip()[:300]}", {"role": s.role, "hook": "vllm", "status": status})
    return {"role": s.role, "hook": "vllm", "ok": True}


# -- deploy ------------------------------------------------------------------------


def plan_from_release(reg: Registry, release_path: str | Path) -> dict[str, ArtifactManifest]:
    """Per role, the registered artifact a fused release descriptor names."""
    try:
        release = json.loads(Path(release_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(INVALID_ARGS, f"release: cannot read {release_path}: {exc}") from None
    arts = release.get("artifacts") if isinstance(release, dict) else None
    if not isinstance(arts, dict) or release.get("kind") != "uff-port.release":
        raise RegistryError(INVALID_MANIFEST, f"release: {release_path} is not a release descriptor "
                            "(expected kind: uff-port.release with artifacts per role)")
    plan: dict[str, ArtifactManifest] = {}
    for role, entry in sorted(arts.items()):
        aid = entry.get("artifact_id") if isinstance(entry, dict) else None
        if not isinstance(aid, str):
            raise RegistryError(INVALID_MANIFEST, f"release.artifacts.{role}.artifact_id: required")
        try:
            plan[role] = reg.resolve(aid)
        except RegistryError as exc:
            raise RegistryError(NOT_FOUND, f"release.artifacts.{role}: {aid[:12]} is not in the registry; "
                                "register or pull it first", {"role": role, "artifact_id": aid}) from exc
        if plan[role].role != role:
            raise RegistryError(INCONSISTENT_RELEASE, f"release.artifacts.{role}: {aid[:12]} is registered "
                                f"as a {plan[role].role} artifact", {"field": "role", "role": role})
    return plan


def plan_from_roles(reg: Registry, specs: list[str]) -> dict[str, ArtifactManifest]:
    """`ufm` (its stable alias) or `ufm=REF` (an id, prefix or alias) per role."""
    plan: dict[str, ArtifactManifest] = {}
    for spec in specs:
        role, _, ref = spec.partition("=")
        if role not in ROLES:
            raise RegistryError(INVALID_ARGS, f"role: unknown {role!r}; expected one of {', '.join(ROLES)}")
        manifest = reg.resolve(ref or f"{role}:stable", role)
        if manifest.role != role:
            raise RegistryError(INVALID_ARGS, f"role: {ref} is a {manifest.role} artifact, not {role}")
        plan[role] = manifest
    if not plan:
        raise RegistryError(INVALID_ARGS, "role: give --role ROLE[=REF] at least once, or --release")
    return plan


def deploy(
    reg: Registry,
    target: str | Path,
    plan: dict[str, ArtifactManifest],
    *,
    keep: int = KEEP_DEFAULT,
    unhold: bool = False,
    hooks: ReloadHooks | None = None,
    port: int = 8000,
) -> DeployResult:
    """Install every planned adapter, then switch each role, then rewrite the launch config.

    All copies finish (and verify) before the first switch, so a failed copy
    leaves the host serving what it served. Held artifacts are refused unless
    `unhold`.
    """
    if keep < 2:
        raise RegistryError(INVALID_ARGS, f"keep: expected at least 2 (current and previous), got {keep}")
    serving = ServingDir(target)
    with serving.locked():
        holds = serving.holds()
        for role, m in plan.items():
            if m.artifact_id in holds and not unhold:
                why = holds[m.artifact_id]
                raise RegistryError(RELEASE_HELD, f"{role}: {m.short_id} was rolled back after the SLO "
                                    f"{why.get('slo')!r} was breached; deploy it again only with --unhold",
                                    {"role": role, "artifact_id": m.artifact_id, "hold": why})
        after = {r: serving.manifest(r, serving.link(r, "current") or "") for r in serving.roles()}
        _agree_base({**after, **plan})
        for role, m in plan.items():
            reg.require_verified(m)
            serving.install(role, m, reg.artifact_dir(m.artifact_id))
        result = DeployResult(str(serving.root))
        for role, m in sorted(plan.items()):
            if unhold:
                serving.clear_hold(m.artifact_id)
            result.switches.append(serving.switch(role, m.artifact_id, "deploy", keep))
        result.launch = serving.write_launch(port)
    if hooks is not None:
        result.reloads = hooks.run(result.switches, serving.root)
    return result


def rollback_role(
    reg: Registry | None,
    target: str | Path,
    role: str,
    *,
    actor: str = "cli",
    note: dict[str, Any] | None = None,
    hold: bool = False,
    hooks: ReloadHooks | None = None,
    expect_current: str | None = None,
) -> dict[str, Any]:
    """Roll a role back in the serving directory and, when it agrees, in the registry.

    The registry's `stable`/`previous` swap too when its `stable` is the
    adapter being rolled back (one audit row per alias, with `note`); if the
    registry has moved on, only the host is rolled back and `registry` says why.
    `hold` puts the rolled-back artifact on the hold list (no automatic redeploy).
    `expect_current` makes it a compare-and-swap: a watcher that judged one
    adapter never rolls back another that a deploy switched in meanwhile.
    """
    serving = ServingDir(target)
    with serving.locked():
        bad = serving.link(role, "current")
        if bad is None:
            raise RegistryError(NOT_FOUND, f"{role}: nothing is deployed in {serving.role_dir(role)}")
        if expect_current is not None and bad != expect_current:
            raise RegistryError(ALIAS_CONFLICT, f"{role}: current is {bad[:12]}, not the judged "
                                f"{expect_current[:12]}; a deploy moved it first",
                                {"role": role, "expected": expect_current, "actual": bad})
        good = serving.link(role, "previous")
        if good is not None:  # the restored bytes must still be the registered ones
            m = serving.manifest(role, good)
            report = verify_tree(serving.version_dir(role, good), m.files_dict(), exclude=(MANIFEST_NAME,))
            if not report.ok:
                raise RegistryError(VERIFY_FAILED, f"{role}: previous version {m.short_id} on the host "
                                    f"fails verification: {report.summary()}", {"verify": report.to_dict()})
        switch = serving.rollback(role)
        if hold:
            serving.set_hold(bad, role, note or {})
        registry_out: dict[str, Any] = {"moved": False}
        if reg is not None:
            current = reg.aliases(role)
            if current.get("stable") == bad and current.get("previous") == good:
                seq = reg.move_aliases(role, {"stable": good, "previous": bad},
                                       {"stable": bad, "previous": good}, "rollback", actor, note)
                registry_out = {"moved": True, "audit_seq": seq}
            else:
                registry_out["reason"] = (
                    f"registry {role}: stable={str(current.get('stable'))[:12]} "
                    f"previous={str(current.get('previous'))[:12]}, not the served pair "
                    f"{bad[:12]}/{str(good)[:12]}; left as is")
        serving.write_launch()
    out: dict[str, Any] = {"role": role, "rolled_back": bad, "restored": good, "version": switch.version,
           "path": switch.path, "held": hold, "registry": registry_out, "reloads": []}
    if hooks is not None:
        out["reloads"] = hooks.run([switch], serving.root)
    return out


def status(target: str | Path) -> dict[str, Any]:
    """What the serving directory holds, per role."""
    serving = ServingDir(target)
    out: dict[str, Any] = {"target": str(serving.root), "roles": {}, "holds": serving.holds()}
    for role in serving.roles():
        versions = sorted(p.name for p in (serving.role_dir(role) / "versions").iterdir()
                          if not p.name.startswith("."))
        out["roles"][role] = {n: serving.link(role, n) for n in LINKS} | {"versions": versions}
    return out


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under a directory (tests and `deploy --status` compare bytes)."""
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}

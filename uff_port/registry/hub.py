"""Publish registered artifacts to a Hugging Face Hub model repo, and pull them back verified.

One artifact is one commit: its files exactly as registered, `artifact.json`
and a model card, with the artifact id in the commit message and as the tag
`artifact-<id>`, so the repo's history is the release history and any
release can be fetched by tag. The commit also deletes files an earlier
artifact left, so a revision holds one artifact and nothing else.

The model card must be the repo's `README.md`; an artifact's own `README.md`
(the stub card peft writes next to the adapter) is stored as
`uff-port/README.md` and put back by `pull`, so the ids still match.

`huggingface_hub` (the optional extra `hub`) loads only here; the `api`
argument takes any object with HfApi's methods (tests pass a fake). The token
comes from huggingface_hub's usual places (`HF_TOKEN`, the stored login) and
is never printed, logged or put in an event.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

from uff_port.hashing import verify_tree
from uff_port.protocol.errors import ErrorCode
from uff_port.registry.errors import (
    HUB_FAILED,
    INVALID_ARGS,
    INVALID_MANIFEST,
    NOT_FOUND,
    VERIFY_FAILED,
    RegistryError,
)
from uff_port.registry.manifest import MANIFEST_NAME, ArtifactManifest, load_manifest
from uff_port.registry.store import Registry

CARD_NAME: Final = "README.md"
STUB_DIR: Final = "uff-port"
"""Where an artifact's own README.md lives on the Hub (the card takes the repo's README.md)."""
TAG_PREFIX: Final = "artifact-"
REPO_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
URI_RE: Final = re.compile(r"^hf://(?P<repo>[^@\s]+)(?:@(?P<rev>[^\s]+))?$")
_KEEP_ON_HUB: Final = frozenset({".gitattributes"})


def hub_path(rel: str) -> str:
    return f"{STUB_DIR}/{rel}" if rel == CARD_NAME else rel


def _hub() -> Any:
    try:
        import huggingface_hub
    except ModuleNotFoundError:
        raise RegistryError(ErrorCode.NOT_AVAILABLE, "huggingface_hub is not installed: pip install 'uff-port[hub]'") from None
    return huggingface_hub


def make_api() -> Any:
    """HfApi with the token from HF_TOKEN or the stored login (None: anonymous, read-only)."""
    hub = _hub()
    return hub.HfApi(token=hub.get_token())


def check_repo(repo: str) -> str:
    if not REPO_RE.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise RegistryError(INVALID_ARGS, f"repo: expected ORG/NAME (letters, digits, . _ -), got {repo!r}")
    return repo


def parse_uri(uri: str) -> tuple[str, str]:
    """`hf://ORG/NAME@REV` -> (repo, revision); REV defaults to main."""
    m = URI_RE.match(uri)
    if not m:
        raise RegistryError(INVALID_ARGS, f"source: expected hf://ORG/NAME[@REVISION], got {uri!r}")
    return check_repo(m.group("repo")), m.group("rev") or "main"


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """One Hub call; its failures become hub_failed naming the call (the message never holds the token)."""
    hub = _hub()
    try:
        return fn(*args, **kwargs)
    except (hub.errors.HfHubHTTPError, hub.errors.HFValidationError, OSError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(HUB_FAILED, f"{what}: {type(exc).__name__}: {first}",
                            {"call": what, "status": status}) from None


# -- the model card ------------------------------------------------------------


def _promotion_gates(reg: Registry, m: ArtifactManifest) -> list[dict[str, Any]] | None:
    for row in reversed(reg.audit(m.role, limit=10_000)):
        if row["action"] == "promote" and row["new_id"] == m.artifact_id and row["alias"] == "stable":
            return list((row["note"] or {}).get("gates") or [])
    return None


def model_card(m: ArtifactManifest, gates: list[dict[str, Any]] | None, *, license: str = "other",
               tags: list[str] | None = None) -> str:
    """README.md: Hub front matter (base_model, library_name, tags, license, model-index) and a body."""
    hub = _hub()
    base_ok = bool(REPO_RE.match(m.base_model.id)) or re.fullmatch(r"[A-Za-z0-9][\w.-]*", m.base_model.id)
    metrics = {k: v for k, v in sorted(m.metrics.items()) if v is not None}
    dataset = f"uff-port-dataset-{m.dataset_hash[:12]}" if m.dataset_hash else "uff-port-held-out"
    evals = [hub.EvalResult(task_type="text-generation", dataset_type=dataset,
                            dataset_name=f"{m.name} held-out split", metric_type=k, metric_value=v)
             for k, v in metrics.items()]
    data = hub.ModelCardData(
        base_model=m.base_model.id if base_ok else None, library_name="peft", license=license,
        tags=sorted({"peft", "lora", "uff-port", f"uff-port-{m.role}", *(tags or [])}),
        model_name=m.name, eval_results=evals or None, pipeline_tag="text-generation",
    )
    lin = m.lineage
    lines = [
        f"# {m.name} {m.version} ({m.role})", "",
        f"A LoRA adapter (peft, r={m.interface.r}, modules {', '.join(m.interface.target_modules) or '-'}) "
        f"for `{m.base_model.id}`" + (f" at revision `{m.base_model.revision}`" if m.base_model.revision else "")
        + f", trained with {m.code_version}. Artifact id `{m.artifact_id}`.", "",
        "## Training", "",
        f"- base model: `{m.base_model.id}`" + ("" if base_ok else " (not a Hub id: not in the front matter)"),
        f"- data: dataset sha256 `{m.dataset_hash or 'unknown'}`; config sha256 `{m.config_hash or 'unknown'}`",
        f"- run `{lin.run_id}` on `{lin.backend}`: {lin.final_step if lin.final_step is not None else '?'} optimizer "
        f"steps in {lin.attempts} trainer start(s)" + (f", parent `{lin.parent}`" if lin.parent else ""),
        "- metrics: " + (", ".join(f"{k} = {v:g}" for k, v in metrics.items()) or "none recorded"), "",
        "## Promotion gates", "",
    ]
    if gates:
        lines += ["| gate | result | measured | threshold |", "|---|---|---|---|"]
        lines += [f"| {g.get('gate')} | {g.get('status')} | {g.get('measured')} | {g.get('threshold')} |"
                  for g in gates]
    else:
        lines.append("Not promoted to stable in the publishing registry.")
    lines += ["", "## Artifact manifest", "", "```json", m.to_json().rstrip(), "```", "",
              "Pull and verify: `uff-port pull hf://REPO@" + TAG_PREFIX + m.artifact_id + "`.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


# -- publish and pull -----------------------------------------------------------


def publish(
    reg: Registry,
    ref: str,
    repo: str,
    *,
    api: Any,
    private: bool = False,
    revision: str | None = None,
    license: str = "other",
    role: str | None = None,
) -> dict[str, Any]:
    """Push one registered artifact as one commit + tag; a no-op if its tag is already there."""
    hub = _hub()
    check_repo(repo)
    m = reg.resolve(ref, role)
    reg.require_verified(m)
    tag = TAG_PREFIX + m.artifact_id
    branch = revision or "main"
    _call("create_repo", api.create_repo, repo, private=private, exist_ok=True, repo_type="model")
    refs = _call("list_repo_refs", api.list_repo_refs, repo, repo_type="model")
    out = {"repo": repo, "revision": branch, "tag": tag, "artifact_id": m.artifact_id,
           "role": m.role, "version": m.version}
    existing = {t.name: t.target_commit for t in refs.tags}
    if tag in existing:
        return {**out, "commit": existing[tag], "created": False}
    if branch not in {b.name for b in refs.branches}:
        _call("create_branch", api.create_branch, repo, branch=branch, repo_type="model")
    src = reg.artifact_dir(m.artifact_id)
    card = model_card(m, _promotion_gates(reg, m), license=license)
    ops: list[Any] = [hub.CommitOperationAdd(path_in_repo=hub_path(rel), path_or_fileobj=str(src / rel))
                      for rel in sorted(m.files)]
    ops.append(hub.CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=m.to_json().encode()))
    ops.append(hub.CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    wanted = {op.path_in_repo for op in ops} | _KEEP_ON_HUB
    present = _call("list_repo_files", api.list_repo_files, repo, revision=branch, repo_type="model")
    head = next((b.target_commit for b in refs.branches if b.name == branch), None)
    if head is not None and MANIFEST_NAME in present and _head_is(api, repo, head, m):
        # committed before, the tag lost (a crash between the two calls): tag that commit, no second one
        _call("create_tag", api.create_tag, repo, tag=tag, tag_message=f"artifact {m.artifact_id}",
              revision=head, repo_type="model")
        return {**out, "commit": head, "created": False}
    ops += [hub.CommitOperationDelete(path_in_repo=p) for p in sorted(set(present) - wanted)]
    message = f"{m.role} {m.name} {m.version}: artifact {m.artifact_id}"
    # parent_commit: if someone else committed to the branch since we listed it, the Hub refuses
    # (412) rather than mixing our files with theirs
    info = _call("create_commit", api.create_commit, repo, ops, commit_message=message,
                 commit_description=f"uff-port artifact {m.artifact_id} ({len(m.files)} files)",
                 revision=branch, repo_type="model", parent_commit=head)
    _call("create_tag", api.create_tag, repo, tag=tag, tag_message=message, revision=info.oid,
          repo_type="model")
    return {**out, "commit": info.oid, "created": True, "commit_url": info.commit_url}


def _head_is(api: Any, repo: str, commit: str, m: ArtifactManifest) -> bool:
    with tempfile.TemporaryDirectory(prefix="uff-head-") as tmp:
        path = _call("hf_hub_download", api.hf_hub_download, repo, MANIFEST_NAME, revision=commit,
                     repo_type="model", local_dir=tmp)
        return Path(path).read_bytes() == m.to_json().encode()


def pull(reg: Registry, uri: str, *, api: Any, actor: str = "cli") -> tuple[ArtifactManifest, bool, str]:
    """Download `hf://ORG/NAME@REV`, verify every file against its artifact.json, then register it.

    Returns (manifest, created, revision). Nothing reaches the registry unless
    each file's size and sha256 match; a tag `artifact-<id>` must name the id
    the manifest carries.
    """
    from uff_port.registry.service import require_finite_weights

    repo, rev = parse_uri(uri)
    with tempfile.TemporaryDirectory(prefix="uff-pull-") as tmp:
        dl = Path(_call("snapshot_download", api.snapshot_download, repo, revision=rev,
                        local_dir=str(Path(tmp) / "download"), repo_type="model"))
        if not (dl / MANIFEST_NAME).is_file():
            raise RegistryError(NOT_FOUND, f"{uri}: no {MANIFEST_NAME} at that revision (not a uff-port artifact)")
        try:
            manifest = load_manifest(dl / MANIFEST_NAME)
        except RegistryError as exc:
            raise RegistryError(exc.code, f"{uri}: {exc.message}", exc.details) from None
        if rev.startswith(TAG_PREFIX) and rev != TAG_PREFIX + manifest.artifact_id:
            raise RegistryError(INVALID_MANIFEST, f"{uri}: artifact_id: the tag names {rev[len(TAG_PREFIX):][:12]}, "
                                f"the manifest {manifest.short_id}")
        stage = Path(tmp) / "stage"
        for rel in sorted(manifest.files):
            src = dl / hub_path(rel)
            if src.is_file():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, stage / rel)
        stage.mkdir(exist_ok=True)
        report = verify_tree(stage, manifest.files_dict())
        if not report.ok:
            raise RegistryError(VERIFY_FAILED, f"{uri}: {report.summary()}",
                                {"verify": report.to_dict(), "repo": repo, "revision": rev})
        require_finite_weights(stage)
        manifest, created = reg.register(stage, manifest, actor)
    return manifest, created, rev


def manifest_from_hub(uri: str, *, api: Any, dest: Path) -> Path:
    """The artifact.json of a Hub revision, downloaded as is (its sha256 is what federation records)."""
    repo, rev = parse_uri(uri)
    local = dest / f"{repo.replace('/', '--')}@{rev}"
    return Path(_call("hf_hub_download", api.hf_hub_download, repo, MANIFEST_NAME, revision=rev,
                      repo_type="model", local_dir=str(local)))


def resolve_inputs(inputs: list[tuple[str, str]], dest: Path, api: Any = None) -> list[tuple[str, str]]:
    """`federate --manifest hf=hf://ORG/NAME@REV`: each hf:// input becomes its downloaded manifest."""
    if not any(path.startswith("hf://") for _, path in inputs):
        return inputs
    api = api if api is not None else make_api()
    return [(who, str(manifest_from_hub(path, api=api, dest=dest)) if path.startswith("hf://") else path)
            for who, path in inputs]

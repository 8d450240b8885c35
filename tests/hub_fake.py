"""An in-memory Hugging Face Hub behind HfApi's method signatures, for offline tests (no tests here).

It refuses what the real Hub refuses, with huggingface_hub's own exception
types: writes without a token (401), an unknown repo (404, also for a private
repo read without a token), an unknown revision, an empty commit message, a
deletion of a missing file, an existing tag or branch without exist_ok (409),
a repo id that fails `validate_repo_id`, and a README.md whose front matter
is not valid model-card metadata (a `base_model` that is not a repo id).
Commits are content snapshots with sha1 ids; tags and branches point at them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2  # huggingface_hub's HTTP client; its errors carry a response of this type
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import CommitInfo, GitRefInfo, GitRefs
from huggingface_hub.utils import validate_repo_id

ENDPOINT = "https://huggingface.co"
KNOWN_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigcode-openrail-m",
    "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "bsd-3-clause", "gpl-3.0", "agpl-3.0", "lgpl-3.0",
    "llama2", "llama3", "llama3.1", "gemma", "deepseek", "unlicense", "other",
})
"""A subset of the Hub's license ids (the Hub refuses a card whose license is not one of its list)."""


def _response(status: int, url: str) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("POST", url))


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeHub:
    """The server side: shared by every FakeHfApi (each with its own token or none)."""

    repos: dict[str, Repo] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)


class FakeHfApi:
    def __init__(self, hub: FakeHub, token: str | None = None) -> None:
        self.hub, self.token = hub, token

    # -- checks the real API makes ----------------------------------------------

    def _auth(self, token: Any, url: str) -> None:
        tok = token if isinstance(token, str) else self.token
        if tok not in self.hub.valid_tokens:
            raise HfHubHTTPError("401 Client Error: Unauthorized (invalid or missing token)",
                                 response=_response(401, url))

    def _repo(self, repo_id: str, repo_type: str | None, token: Any = None, *, write: bool = False) -> Repo:
        validate_repo_id(repo_id)
        assert repo_type in (None, "model"), repo_type
        url = f"{ENDPOINT}/api/models/{repo_id}"
        if write:
            self._auth(token, url)
        repo = self.hub.repos.get(repo_id)
        tok = token if isinstance(token, str) else self.token
        if repo is None or (repo.private and tok not in self.hub.valid_tokens):
            raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {url}",
                                          response=_response(404, url))
        return repo

    def _resolve(self, repo_id: str, repo: Repo, revision: str | None) -> str:
        rev = revision or "main"
        oid = repo.branches.get(rev) or repo.tags.get(rev) or (rev if rev in repo.commits else None)
        if oid is None:
            url = f"{ENDPOINT}/api/models/{repo_id}/revision/{rev}"
            raise RevisionNotFoundError(f"404 Client Error. Revision Not Found for url: {url}",
                                        response=_response(404, url))
        return oid

    @staticmethod
    def _check_card(content: bytes, url: str) -> None:
        """The Hub answers 400 "Invalid metadata in README.md" for front matter it cannot accept."""
        text = content.decode("utf-8")
        if not text.startswith("---\n"):
            return
        problems = []
        meta = yaml.safe_load(text.split("---\n", 2)[1]) or {}
        if not isinstance(meta, dict):
            problems.append("front matter is not a mapping")
            meta = {}
        bases = meta.get("base_model")
        for base in [bases] if isinstance(bases, str) else bases or []:
            try:
                validate_repo_id(base)
            except HFValidationError:
                problems.append(f'"base_model" {base!r} is not a model id')
        if "license" in meta and meta["license"] not in KNOWN_LICENSES:
            problems.append(f'"license" must be one of the Hub\'s license ids, got {meta["license"]!r}')
        if "tags" in meta and not isinstance(meta["tags"], list):
            problems.append('"tags" must be an array')
        if problems:
            raise HfHubHTTPError("400 Bad Request: Invalid metadata in README.md.\n- " + "\n- ".join(problems),
                                 response=_response(400, url))

    # -- HfApi surface ------------------------------------------------------------

    def create_repo(self, repo_id: str, *, token: Any = None, private: bool | None = None,
                    repo_type: str | None = None, exist_ok: bool = False, **_: Any) -> str:
        self.hub.calls.append(("create_repo", {"repo_id": repo_id, "private": private}))
        validate_repo_id(repo_id)
        self._auth(token, f"{ENDPOINT}/api/repos/create")
        if repo_id in self.hub.repos:
            if not exist_ok:
                raise HfHubHTTPError("409 Conflict: You already created this model repo",
                                     response=_response(409, f"{ENDPOINT}/api/repos/create"))
        else:
            repo = Repo(private=bool(private))
            init = Commit(hashlib.sha1(repo_id.encode()).hexdigest(), None, "initial commit", "",
                          {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            repo.commits[init.oid] = init
            repo.branches["main"] = init.oid
            self.hub.repos[repo_id] = repo
        return f"{ENDPOINT}/{repo_id}"

    def list_repo_refs(self, repo_id: str, *, repo_type: str | None = None, token: Any = None,
                       **_: Any) -> GitRefs:
        repo = self._repo(repo_id, repo_type, token)
        return GitRefs(
            branches=[GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit=o) for n, o in repo.branches.items()],
            converts=[],
            tags=[GitRefInfo(name=n, ref=f"refs/tags/{n}", target_commit=o) for n, o in repo.tags.items()],
        )

    def list_repo_files(self, repo_id: str, *, revision: str | None = None, repo_type: str | None = None,
                        token: Any = None) -> list[str]:
        repo = self._repo(repo_id, repo_type, token)
        return sorted(repo.commits[self._resolve(repo_id, repo, revision)].files)

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None, token: Any = None,
                      repo_type: str | None = None, exist_ok: bool = False) -> None:
        repo = self._repo(repo_id, repo_type, token, write=True)
        if branch in repo.branches and not exist_ok:
            raise HfHubHTTPError(f"409 Conflict: branch {branch} exists",
                                 response=_response(409, f"{ENDPOINT}/api/models/{repo_id}/branch/{branch}"))
        repo.branches.setdefault(branch, self._resolve(repo_id, repo, revision))

    def create_commit(self, repo_id: str, operations: Any, *, commit_message: str,
                      commit_description: str | None = None, token: Any = None, repo_type: str | None = None,
                      revision: str | None = None, create_pr: bool | None = None,
                      parent_commit: str | None = None, **_: Any) -> CommitInfo:
        if not commit_message:
            raise ValueError("`commit_message` can't be empty, please pass a value.")
        ops = list(operations)
        self.hub.calls.append(("create_commit", {"repo_id": repo_id, "revision": revision,
                                                 "message": commit_message,
                                                 "paths": [op.path_in_repo for op in ops]}))
        repo = self._repo(repo_id, repo_type, token, write=True)
        branch = revision or "main"
        if branch not in repo.branches:
            raise RevisionNotFoundError(f"404 Client Error. Revision Not Found: {branch}",
                                        response=_response(404, f"{ENDPOINT}/api/models/{repo_id}/commit/{branch}"))
        head = repo.branches[branch]
        if parent_commit is not None and parent_commit != head:
            raise HfHubHTTPError("412 Precondition Failed: parent commit is not the head",
                                 response=_response(412, f"{ENDPOINT}/api/models/{repo_id}/commit/{branch}"))
        files = dict(repo.commits[head].files)
        for op in ops:
            if isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                if isinstance(src, (str, Path)):
                    data = Path(src).read_bytes()
                elif isinstance(src, bytes):
                    data = src
                else:
                    assert isinstance(src, io.BufferedIOBase)
                    data = src.read()
                if op.path_in_repo == "README.md":
                    self._check_card(data, f"{ENDPOINT}/api/models/{repo_id}/commit/{branch}")
                files[op.path_in_repo] = data
            elif isinstance(op, CommitOperationDelete):
                if op.path_in_repo not in files:
                    raise RemoteEntryNotFoundError(f"404: {op.path_in_repo} does not exist at {branch}",
                                                   response=_response(404, f"{ENDPOINT}/{repo_id}"))
                del files[op.path_in_repo]
            else:
                raise TypeError(f"unknown operation {op!r}")
        h = hashlib.sha1(head.encode() + commit_message.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        commit = Commit(h.hexdigest(), head, commit_message, commit_description or "", files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return CommitInfo(commit_url=f"{ENDPOINT}/{repo_id}/commit/{commit.oid}", commit_message=commit_message,
                          commit_description=commit_description or "", oid=commit.oid, pr_url=None)

    def create_tag(self, repo_id: str, *, tag: str, tag_message: str | None = None, revision: str | None = None,
                   token: Any = None, repo_type: str | None = None, exist_ok: bool = False) -> None:
        self.hub.calls.append(("create_tag", {"repo_id": repo_id, "tag": tag, "revision": revision}))
        repo = self._repo(repo_id, repo_type, token, write=True)
        oid = self._resolve(repo_id, repo, revision)
        if tag in repo.tags and not exist_ok:
            raise HfHubHTTPError(f"409 Conflict: tag {tag} already exists",
                                 response=_response(409, f"{ENDPOINT}/api/models/{repo_id}/tag/{revision}"))
        repo.tags[tag] = oid

    def snapshot_download(self, repo_id: str, *, repo_type: str | None = None, revision: str | None = None,
                          local_dir: str | Path | None = None, token: Any = None, **_: Any) -> str:
        repo = self._repo(repo_id, repo_type, token)
        commit = repo.commits[self._resolve(repo_id, repo, revision)]
        assert local_dir is not None, "tests download into a local_dir"
        for path, data in commit.files.items():
            dest = Path(local_dir) / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return str(local_dir)

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str | None = None,
                        repo_type: str | None = None, local_dir: str | Path | None = None, token: Any = None,
                        **_: Any) -> str:
        repo = self._repo(repo_id, repo_type, token)
        commit = repo.commits[self._resolve(repo_id, repo, revision)]
        if filename not in commit.files:
            raise RemoteEntryNotFoundError(f"404: {filename} not found in {repo_id}@{revision}",
                                           response=_response(404, f"{ENDPOINT}/{repo_id}/{filename}"))
        assert local_dir is not None
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(commit.files[filename])
        return str(dest)

"""Publish to and pull from the Hub through a fake HfApi: round trip, model card, tags, refusals, no token leaks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest
from hub_fake import FakeHfApi, FakeHub
from release_fixtures import role_artifacts
from test_registry_fixtures import bench_file, gates_file

from uff_port import cli
from uff_port.protocol import CommandError
from uff_port.registry import hub, release_cli
from uff_port.registry.gates import load_evidence, load_gates
from uff_port.registry.manifest import ArtifactManifest, parse_manifest
from uff_port.registry.promotion import promote
from uff_port.registry.store import Registry

pytestmark = pytest.mark.slow

TOKEN = "hf_" + "s3cr3tT0kenValue" * 2


@pytest.fixture(scope="module")
def published_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ArtifactManifest]]:
    base = tmp_path_factory.mktemp("hub")
    with Registry(base / "reg") as reg:
        arts = role_artifacts(reg, base, "ufm", 2, seed0=70)
        gates = load_gates(gates_file(base / "gates.yaml"))
        assert promote(reg, arts[0].artifact_id, gates, evidence=load_evidence(bench_file(base / "b.json"))).moved
    return base / "reg", arts


def _cli(*argv: str) -> int:
    return cli.main(list(argv))


def test_publish_pull_round_trip_and_model_card(
    published_world: tuple[Path, list[ArtifactManifest]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    reg_dir, arts = published_world
    a, b = arts
    server = FakeHub(valid_tokens={TOKEN})
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual place; huggingface_hub.get_token reads it
    monkeypatch.setattr(release_cli, "_api", lambda: FakeHfApi(server, token=huggingface_hub.get_token()))
    printed: list[str] = []

    def output() -> str:
        got = capsys.readouterr()
        printed.extend((got.out, got.err))
        return got.out

    assert _cli("publish", "ufm:stable", "--repo", "acme/ufm-adapter", "--registry", str(reg_dir),
                "--private", "--license", "apache-2.0", "--json") == 0
    out = json.loads(output())
    repo = server.repos["acme/ufm-adapter"]
    assert repo.private and out["created"] and out["tag"] == f"artifact-{a.artifact_id}"
    head = repo.commits[repo.branches["main"]]
    assert repo.tags[out["tag"]] == head.oid == out["commit"]
    assert a.artifact_id in head.message and head.message.startswith("ufm ufm-adapter 1.0.0")
    expected = {hub.hub_path(rel) for rel in a.files} | {"artifact.json", "README.md", ".gitattributes"}
    assert set(head.files) == expected and "uff-port/README.md" in head.files  # peft's stub card kept aside
    with Registry(reg_dir) as reg:
        for rel in a.files:  # exactly as registered
            assert head.files[hub.hub_path(rel)] == (reg.artifact_dir(a.artifact_id) / rel).read_bytes()

    # the card: front matter parsed back with huggingface_hub, body with gates and manifest
    card_path = tmp_path / "README.md"
    card_path.write_bytes(head.files["README.md"])
    meta = huggingface_hub.metadata_load(card_path)
    assert meta is not None
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0" and "base_model" not in meta
    assert {"peft", "lora", "uff-port", "uff-port-ufm"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    values = {r["metrics"][0]["type"]: r["metrics"][0]["value"] for r in results}
    assert values["eval_loss"] == pytest.approx(a.metrics["eval_loss"])
    card = huggingface_hub.ModelCard(head.files["README.md"].decode())
    assert card.data.model_name == "ufm-adapter"
    assert "| quality | pass |" in card.text and "| integrity | pass |" in card.text
    assert f'"artifact_id": "{a.artifact_id}"' in card.text and "4 optimizer steps in 2 trainer start(s)" in card.text

    # one commit per artifact: publishing again changes nothing; the next artifact is the next commit
    commits = len(repo.commits)
    assert _cli("publish", a.artifact_id, "--repo", "acme/ufm-adapter", "--registry", str(reg_dir)) == 0
    assert "already published" in output() and len(repo.commits) == commits
    assert _cli("publish", b.artifact_id, "--repo", "acme/ufm-adapter", "--registry", str(reg_dir)) == 0
    assert len(repo.commits) == commits + 1 and len(repo.tags) == 2
    assert "published ufm 1.1.0" in output()
    # a tag lost after its commit (a crash between the two calls): the head is tagged, not committed again
    lost = repo.tags.pop(f"artifact-{b.artifact_id}")
    assert _cli("publish", b.artifact_id, "--repo", "acme/ufm-adapter", "--registry", str(reg_dir)) == 0
    assert repo.tags[f"artifact-{b.artifact_id}"] == lost and len(repo.commits) == commits + 1
    output()

    # pull by tag into another registry: verified, registered, same bytes; twice is a no-op
    other = tmp_path / "other-reg"
    assert _cli("pull", f"hf://acme/ufm-adapter@artifact-{a.artifact_id}", "--registry", str(other), "--json") == 0
    pulled = json.loads(output())
    assert pulled["artifact_id"] == a.artifact_id and pulled["created"]
    with Registry(other) as reg2, Registry(reg_dir) as reg:
        assert reg2.verify(a.artifact_id).ok
        assert reg2.resolve(a.artifact_id).to_dict() == a.to_dict()
        for rel in a.files:
            assert (reg2.artifact_dir(a.artifact_id) / rel).read_bytes() == (
                reg.artifact_dir(a.artifact_id) / rel).read_bytes()
    assert _cli("pull", "hf://acme/ufm-adapter", "--registry", str(other), "--json") == 0  # main = b now
    assert json.loads(output())["artifact_id"] == b.artifact_id

    # the token went to the fake's auth check and nowhere else
    output()
    assert printed and not [p for p in printed if TOKEN in p]
    for commit in repo.commits.values():
        assert TOKEN not in commit.message + commit.description
        assert all(TOKEN.encode() not in data for data in commit.files.values())
    assert TOKEN not in json.dumps(server.calls)


def test_pull_refuses_tampered_or_missing_and_errors_name_the_call(
    published_world: tuple[Path, list[ArtifactManifest]], tmp_path: Path
) -> None:
    reg_dir, arts = published_world
    a = arts[0]
    server = FakeHub(valid_tokens={TOKEN})
    api = FakeHfApi(server, token=TOKEN)
    with Registry(reg_dir) as reg:
        hub.publish(reg, a.artifact_id, "acme/ufm", api=api)
    repo = server.repos["acme/ufm"]
    # someone pushes other weights under the same manifest
    weights = "adapter_model.safetensors"
    head = repo.commits[repo.branches["main"]]
    api.create_branch("acme/ufm", branch="tampered")
    data = bytearray(head.files[weights])
    data[len(data) // 2] ^= 1
    api.create_commit("acme/ufm", [huggingface_hub.CommitOperationAdd(weights, bytes(data))],
                      commit_message="edit", revision="tampered")
    with Registry(tmp_path / "r2") as reg2:
        with pytest.raises(CommandError) as exc:
            hub.pull(reg2, "hf://acme/ufm@tampered", api=api)
        assert exc.value.code == "verify_failed" and f"sha256 mismatch: {weights}" in exc.value.message
        assert reg2.artifacts() == []
        # a tag that names another id than the manifest
        api.create_tag("acme/ufm", tag="artifact-" + "0" * 64, revision="main")
        with pytest.raises(CommandError) as exc:
            hub.pull(reg2, "hf://acme/ufm@artifact-" + "0" * 64, api=api)
        assert exc.value.code == "invalid_manifest"
        with pytest.raises(CommandError) as exc:
            hub.pull(reg2, "hf://acme/nope", api=api)
        assert exc.value.code == "hub_failed" and exc.value.details == {"call": "snapshot_download", "status": 404}
        with pytest.raises(CommandError) as exc:
            hub.pull(reg2, "hf://acme/ufm@no-such-branch", api=api)
        assert exc.value.code == "hub_failed" and "RevisionNotFoundError" in exc.value.message
        with pytest.raises(CommandError) as exc:
            hub.pull(reg2, "acme/ufm", api=api)
        assert exc.value.code == "invalid_args"
    # another publisher commits between our listing and our commit: the Hub refuses ours (412)
    class Racing(FakeHfApi):
        def list_repo_files(self, repo_id: str, **kw: object) -> list[str]:
            files = super().list_repo_files(repo_id, **kw)  # type: ignore[arg-type]
            FakeHfApi(server, token=TOKEN).create_commit(
                repo_id, [huggingface_hub.CommitOperationAdd("notes.txt", b"theirs")], commit_message="theirs")
            return files

    with Registry(reg_dir) as reg, pytest.raises(CommandError) as exc:
        hub.publish(reg, arts[1].artifact_id, "acme/ufm", api=Racing(server, token=TOKEN))
    assert exc.value.details == {"call": "create_commit", "status": 412}
    assert f"artifact-{arts[1].artifact_id}" not in repo.tags
    # private repos are invisible without a token; writes need one
    with Registry(reg_dir) as reg:
        hub.publish(reg, a.artifact_id, "acme/private", api=api, private=True)
        with pytest.raises(CommandError) as exc:
            hub.publish(reg, a.artifact_id, "acme/x", api=FakeHfApi(server, token=None))
        assert exc.value.code == "hub_failed" and exc.value.details["status"] == 401
        with pytest.raises(CommandError) as exc:  # the Hub refuses front matter it cannot read
            hub.publish(reg, a.artifact_id, "acme/bad-license", api=api, license="my-own-terms")
        assert exc.value.details == {"call": "create_commit", "status": 400}
        assert "Invalid metadata in README.md" in exc.value.message
    with Registry(tmp_path / "r3") as reg3, pytest.raises(CommandError) as exc:
        hub.pull(reg3, "hf://acme/private", api=FakeHfApi(server, token=None))
    assert exc.value.details["status"] == 404


def test_card_front_matter_names_a_hub_base_model(published_world: tuple[Path, list[ArtifactManifest]]) -> None:
    m = published_world[1][0]
    raw = m.to_dict()
    raw["base_model"] = {"id": "deepseek-ai/deepseek-coder-1.3b-base", "revision": "abc123"}
    text = hub.model_card(parse_manifest(raw), None)
    card = huggingface_hub.ModelCard(text)
    assert card.data.base_model == "deepseek-ai/deepseek-coder-1.3b-base" and card.data.to_dict()["library_name"] == "peft"
    assert "Not promoted to stable" in card.text


def test_federate_reads_a_manifest_from_the_hub(
    published_world: tuple[Path, list[ArtifactManifest]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg_dir, arts = published_world
    server = FakeHub(valid_tokens={TOKEN})
    api = FakeHfApi(server, token=TOKEN)
    with Registry(reg_dir) as reg:
        out = hub.publish(reg, arts[1].artifact_id, "acme/ufm", api=api)
    monkeypatch.setattr(hub, "make_api", lambda: FakeHfApi(server, token=None))  # public repo: no token
    fused = tmp_path / "fused.json"
    assert _cli("federate", "--manifest", f"hf=hf://acme/ufm@{out['tag']}", "--output", str(fused), "--no-gates") == 0
    release = json.loads(fused.read_text())
    on_hub = server.repos["acme/ufm"].commits[out["commit"]].files["artifact.json"]
    assert release["artifacts"]["ufm"]["artifact_id"] == arts[1].artifact_id
    assert release["providers"]["hf"]["manifest_sha256"] == hashlib.sha256(on_hub).hexdigest()

"""Fused releases from hf/gcp/aws provider manifests, and their refusals."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from test_registry_fixtures import PYTHON, ROOT, gates_file, uff

from uff_port.protocol import CommandError
from uff_port.registry.federate import federate, parse_manifest_flags
from uff_port.registry.gates import load_gates
from uff_port.registry.manifest import artifact_id

DATA = ROOT / "tests" / "data" / "registry"
INPUTS = [("hf", DATA / "hf.json"), ("gcp", DATA / "gcp.json"), ("aws", DATA / "aws.json")]


def _flags() -> list[str]:
    return [a for p, path in INPUTS for a in ("--manifest", f"{p}={path}")]


def test_fused_manifest_equals_checked_in_file(tmp_path: Path) -> None:
    out = tmp_path / "fused.json"
    res = uff("federate", *_flags(), "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == (DATA / "fused_expected.json").read_bytes()
    assert "spiralverse-ai-federated-v1.2.0: accepted" in res.stdout


def test_orchestrator_script_takes_the_users_flags(tmp_path: Path) -> None:
    out = tmp_path / "fused_manifest.json"
    res = subprocess.run(
        [PYTHON, "scripts/federated_orchestrator.py", "--hf-manifest", str(DATA / "hf.json"),
         "--gcp-manifest", str(DATA / "gcp.json"), "--aws-manifest", str(DATA / "aws.json"),
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == (DATA / "fused_expected.json").read_bytes()


def test_release_content_is_what_the_inputs_say() -> None:
    release = federate(INPUTS, load_gates())
    assert release["name"] == "spiralverse-ai-federated-v1.2.0"  # highest artifact version
    assert release["roles"] == ["textgen", "uam", "ucm", "ufm"]
    assert release["artifacts"]["textgen"]["providers"] == ["aws", "hf"]  # a mirror, not a conflict
    expected_id = hashlib.sha256(
        "".join(f"{a['artifact_id']}  {r}\n" for r, a in sorted(release["artifacts"].items())).encode()
    ).hexdigest()
    assert release["release_id"] == expected_id
    assert release["providers"]["hf"]["manifest_sha256"] == hashlib.sha256((DATA / "hf.json").read_bytes()).hexdigest()
    assert "created_at" not in release
    stamped = federate(INPUTS, None, version="2.0.0", created_at="2026-11-23T12:00:00Z")
    assert stamped["name"] == "spiralverse-ai-federated-v2.0.0" and stamped["created_at"].startswith("2026")


def _rewrite(tmp_path: Path, name: str, mutate) -> list[tuple[str, Path]]:  # type: ignore[no-untyped-def]
    raw = json.loads((DATA / f"{name}.json").read_text())
    mutate(raw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return [(p, path if p == name else src) for p, src in INPUTS]


def _rehash(m: dict) -> None:  # type: ignore[type-arg]
    m["artifact_id"] = artifact_id(m["files"])


@pytest.mark.parametrize(
    ("name", "mutate", "code", "field"),
    [
        ("hf", lambda m: m["base_model"].update(id="deepseek-ai/deepseek-coder-6.7b-base"),
         "inconsistent_release", "base_model.id"),
        ("gcp", lambda m: m["artifacts"][1]["base_model"].update(revision="main"),
         "inconsistent_release", "base_model.revision"),
        ("aws", lambda m: m["artifacts"][0].update(tokenizer_hash="0" * 64),
         "inconsistent_release", "tokenizer_hash"),
        ("aws", lambda m: (m["artifacts"][1]["files"]["adapter_model.safetensors"].update(sha256="1" * 64),
                           _rehash(m["artifacts"][1])),
         "inconsistent_release", "role: 'textgen'"),
        ("hf", lambda m: m["files"]["tokenizer.json"].update(sha256="2" * 64),
         "invalid_manifest", "hf.artifact_id: does not match"),
        ("gcp", lambda m: m["artifacts"][0].update(role="chat"), "invalid_manifest", "gcp.artifacts[0].role: unknown role"),
        ("aws", lambda m: m["artifacts"][0].pop("lineage"), "invalid_manifest", "aws.artifacts[0].lineage: required"),
        ("hf", lambda m: m["metrics"].update(eval_loss=9.5), "gate_failed", "textgen.quality"),
        ("hf", lambda m: m["metrics"].update(safety_violations=2), "gate_failed", "textgen.safety"),
    ],
)
def test_inconsistent_or_bad_inputs_are_refused_naming_the_field(
    tmp_path: Path, name: str, mutate, code: str, field: str  # type: ignore[no-untyped-def]
) -> None:
    inputs = _rewrite(tmp_path, name, mutate)
    gates = load_gates(gates_file(tmp_path / "gates.yaml", quality={"threshold": 2.0}))
    if name == "hf":  # the aws bundle mirrors hf's textgen: keep them equal unless testing that
        aws = json.loads((DATA / "aws.json").read_text())
        aws["artifacts"][1] = json.loads(Path(inputs[0][1]).read_text())
        (tmp_path / "aws.json").write_text(json.dumps(aws))
        inputs[2] = ("aws", tmp_path / "aws.json")
    with pytest.raises(CommandError) as exc:
        federate(inputs, gates)
    assert exc.value.code == code
    assert field in exc.value.message


def test_cli_refusal_exit_code_and_message(tmp_path: Path) -> None:
    bad = copy.deepcopy(json.loads((DATA / "hf.json").read_text()))
    bad["base_model"]["id"] = "other/model"
    (tmp_path / "hf.json").write_text(json.dumps(bad))
    out = tmp_path / "fused.json"
    res = uff("federate", "--manifest", f"hf={tmp_path / 'hf.json'}", "--manifest", f"gcp={DATA / 'gcp.json'}",
              "--output", str(out))
    assert res.returncode == 8 and "inconsistent_release" in res.stderr and "base_model.id" in res.stderr
    assert not out.exists()  # nothing written on refusal


def test_manifest_flag_parsing() -> None:
    assert parse_manifest_flags(["HF=a.json", "b.json"]) == [("hf", "a.json"), ("p2", "b.json")]
    with pytest.raises(CommandError):
        parse_manifest_flags(["hf="])
    with pytest.raises(CommandError) as exc:
        federate([("hf", DATA / "hf.json"), ("hf", DATA / "hf.json")], None)
    assert "repeated provider" in exc.value.message


def test_quality_is_judged_against_the_previous_release(tmp_path: Path) -> None:
    previous = json.loads((DATA / "fused_expected.json").read_text())
    assert federate(INPUTS, load_gates(), baseline=previous)["name"] == "spiralverse-ai-federated-v1.2.0"

    def worse(m: dict) -> None:  # type: ignore[type-arg]
        m["metrics"]["eval_loss"] = 1.5  # stable 1.12 + max_regression 0.05 < 1.5
        m["files"]["adapter_model.safetensors"]["sha256"] = "3" * 64
        _rehash(m)

    inputs = _rewrite(tmp_path, "hf", worse)
    inputs = [i for i in inputs if i[0] != "aws"]  # aws still mirrors the old textgen
    with pytest.raises(CommandError) as exc:
        federate(inputs, load_gates(), baseline=previous)
    assert exc.value.code == "gate_failed" and "textgen.quality" in exc.value.message
    assert "regresses past stable 1.12" in exc.value.message
    out = tmp_path / "fused.json"
    res = uff("federate", "--manifest", f"hf={inputs[0][1]}", "--manifest", f"gcp={DATA / 'gcp.json'}",
              "--baseline", str(DATA / "fused_expected.json"), "--output", str(out))
    assert res.returncode == 6 and "REFUSED" in res.stdout and not out.exists()


def test_artifact_directories_are_rehashed(tmp_path: Path) -> None:
    from uff_port.registry.runmanifest import write_run_manifest

    def artifact(name: str, role: str) -> Path:
        final = tmp_path / name / "final"
        final.mkdir(parents=True)
        (final / "adapter_model.safetensors").write_bytes(name.encode() * 100)
        (final / "tokenizer.json").write_text('{"model": "bpe"}')
        (tmp_path / name / "config.yaml").write_text(f"name: {name}\nmodel:\n  name_or_path: org/base\n")
        write_run_manifest(tmp_path / name, role=role, version="0.3.0")
        return final

    hf, aws = artifact("main", "textgen"), artifact("uam", "uam")
    release = federate([("hf", hf), ("aws", aws)], None)
    assert release["name"] == "spiralverse-ai-federated-v0.3.0" and release["roles"] == ["textgen", "uam"]
    weights = aws / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[::-1])  # same size, other bytes
    with pytest.raises(CommandError) as exc:
        federate([("hf", hf), ("aws", aws)], None)
    assert exc.value.code == "verify_failed"
    assert exc.value.message == "aws.files: sha256 mismatch: adapter_model.safetensors"

"""Manifest parsing (properties), content ids, and run manifests from partial run dirs."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_registry_fixtures import ROOT

from uff_port.protocol import CommandError
from uff_port.registry.manifest import ROLES, artifact_id, load_manifest, parse_manifest
from uff_port.registry.runmanifest import attempts_from_events, write_run_manifest

VALID: dict[str, Any] = json.loads((ROOT / "tests" / "data" / "registry" / "hf.json").read_text())
TOP_FIELDS = sorted(VALID)
REQUIRED = ["schema_version", "artifact_id", "name", "role", "version", "files", "base_model",
            "code_version", "lineage"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    return out


ALL_PATHS = _paths(VALID)


def _problems(raw: Any) -> list[str]:
    with pytest.raises(CommandError) as exc:
        parse_manifest(raw)
    assert exc.value.code == "invalid_manifest"
    return list((exc.value.details or {}).get("problems", []))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ALL_PATHS), value=json_value, delete=st.booleans())
def test_mutated_manifest_parses_or_names_a_field(path: tuple[str, ...], value: Any, delete: bool) -> None:
    """Any single-field edit: accepted, or refused with problems that each name a dotted field."""
    raw = copy.deepcopy(VALID)
    node = raw
    for key in path[:-1]:
        node = node[key]
    if delete:
        node.pop(path[-1])
    else:
        node[path[-1]] = value
    try:
        parse_manifest(raw)
    except CommandError as exc:
        assert exc.code == "invalid_manifest"
        problems = exc.details["problems"]
        assert problems
        for problem in problems:
            field, sep, message = problem.partition(": ")
            assert sep and message and field.split(".")[0] in {*TOP_FIELDS, "<root>"}, problem


@settings(max_examples=100, deadline=None)
@given(st.one_of(json_value, st.dictionaries(st.sampled_from(TOP_FIELDS), json_value)))
def test_arbitrary_json_never_crashes_the_parser(raw: Any) -> None:
    try:
        parse_manifest(raw)
    except CommandError as exc:
        assert exc.code == "invalid_manifest" and exc.message


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field_is_named(field: str) -> None:
    raw = copy.deepcopy(VALID)
    del raw[field]
    assert f"{field}: required" in _problems(raw)


def test_specific_refusals_name_the_field() -> None:
    def with_(**changes: Any) -> dict[str, Any]:
        raw = copy.deepcopy(VALID)
        raw.update(changes)
        return raw

    assert any(p.startswith("role: unknown role 'chat'") for p in _problems(with_(role="chat")))
    assert any(p.startswith("version: expected a semantic version") for p in _problems(with_(version="1.2")))
    assert any(p.startswith("tokenizer_hash: expected 64") for p in _problems(with_(tokenizer_hash="abc")))
    assert any(p.startswith("extra: unknown field") for p in _problems(with_(extra=1)))
    assert any(p.startswith("schema_version: unsupported") for p in _problems(with_(schema_version=2)))
    files = copy.deepcopy(VALID["files"])
    files["../escape"] = files.pop("tokenizer.json")
    assert any(p.startswith("files: ") and "'..'" in p for p in _problems(with_(files=files)))
    tampered = copy.deepcopy(VALID)
    tampered["files"]["adapter_model.safetensors"]["sha256"] = "f" * 64
    assert any(p.startswith("artifact_id: does not match") for p in _problems(tampered))
    nan = copy.deepcopy(VALID)
    nan["metrics"]["eval_loss"] = float("nan")
    assert any(p.startswith("metrics") for p in _problems(nan))
    assert set(ROLES) == {"textgen", "embed", "runtime", "ufm", "ucm", "urm", "ulm", "uim", "uam"}


def test_artifact_id_is_sha256sum_of_the_file_list(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    (tmp_path / "sub" / "a.txt").write_text("hello")
    listing = subprocess.run(["sha256sum", "b.bin", "sub/a.txt"], cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout
    files = {rel: {"sha256": hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()}
             for rel in ("sub/a.txt", "b.bin")}
    assert artifact_id(files) == hashlib.sha256(listing.encode()).hexdigest()


def _final(run: Path) -> None:
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "final" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "deepseek-ai/deepseek-coder-1.3b-base", "peft_type": "LORA",
         "task_type": "CAUSAL_LM", "r": 8, "target_modules": ["v_proj", "q_proj"]}))


def test_run_manifest_tolerates_missing_optional_pieces(tmp_path: Path) -> None:
    run = tmp_path / "job-7"
    _final(run)
    (run / "final" / "merged").mkdir()
    (run / "final" / "merged" / "model.safetensors").write_bytes(b"derived")
    m = load_manifest(write_run_manifest(run))  # no config.yaml, no events.jsonl
    assert m.base_model.id == "deepseek-ai/deepseek-coder-1.3b-base"
    assert m.lineage.run_id == "job-7" and m.lineage.attempts == 1 and m.metrics == {}
    assert m.config_hash is None and m.tokenizer_hash is None and m.interface.r == 8
    assert sorted(m.files) == ["adapter_config.json", "adapter_model.safetensors"]


def test_run_manifest_reads_lineage_and_metrics_from_events(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _final(run)
    (run / "config.yaml").write_text("name: ufm-adapter\nstrategy: kaggle\ndata:\n  managers: [UFM]\n")
    events = [
        {"event": "state", "state": "loading", "step": 0, "job_id": "j1"},
        {"event": "eval", "step": 20, "loss": 2.5, "perplexity": 12.1},
        {"event": "progress", "step": 21, "loss": 9.9},
        {"event": "state", "state": "loading", "step": 20},  # restarted after preemption
        {"event": "eval", "step": 40, "loss": 2.25, "perplexity": 9.5},
        {"event": "finished", "step": 40, "loss": 2.1, "eval_loss": 2.25, "final": "/x", "tokens_seen": 9000},
    ]
    text = "".join(json.dumps(e) + "\n" for e in events) + '{"event": "state", "sta'  # torn last line
    (run / "events.jsonl").write_text(text)
    m = load_manifest(write_run_manifest(run, version="1.0.0", created_at="2026-11-23T12:00:00Z"))
    assert m.role == "ufm" and m.name == "ufm-adapter" and m.version == "1.0.0"
    assert m.lineage.attempts == 2 and m.lineage.backend == "kaggle" and m.lineage.run_id == "j1"
    assert m.lineage.final_step == 40 and m.lineage.sessions == []  # no merged cloud events: a local run
    assert m.metrics == {"eval_loss": 2.25, "perplexity": 9.5, "train_loss": 2.1, "tokens_seen": 9000.0}
    assert m.dataset_hash is not None and m.created_at == "2026-11-23T12:00:00Z"
    assert attempts_from_events([{"event": "log", "attempt": 1}, {"event": "log", "attempt": 3}]) == 2


def test_run_manifest_without_adapter_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as exc:
        write_run_manifest(tmp_path)
    assert exc.value.code == "not_found" and "run_dir" in exc.value.message


def test_register_checks_hashes_while_copying(tmp_path: Path) -> None:
    from uff_port.registry.runmanifest import build_manifest
    from uff_port.registry.store import Registry

    run = tmp_path / "run"
    _final(run)
    manifest = build_manifest(run / "final", run_dir=run)
    (run / "final" / "adapter_model.safetensors").write_bytes(b"WEIGHTS")  # same size, other bytes
    with Registry(tmp_path / "reg") as reg:
        with pytest.raises(CommandError) as exc:
            reg.register(run / "final", manifest)
        assert exc.value.code == "verify_failed"
        assert "sha256 mismatch: adapter_model.safetensors" in exc.value.message
        assert list((tmp_path / "reg" / "artifacts").iterdir()) == []  # no partial copy left
        assert reg.artifacts() == []
        (run / "final" / "adapter_model.safetensors").write_bytes(b"weights")
        (run / "final" / "notes.txt").write_text("not in the manifest")
        with pytest.raises(CommandError) as exc:
            reg.register(run / "final", manifest)
        assert "unexpected: notes.txt" in exc.value.message
        (run / "final" / "notes.txt").unlink()
        assert reg.register(run / "final", manifest) == (manifest, True)
        assert reg.verify(manifest.artifact_id).ok


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["schema_version", "quality", "latency", "safety", "compatibility", "x"]),
                       st.one_of(json_value, st.dictionaries(
                           st.sampled_from(["enabled", "metric", "max_regression", "threshold", "max_p95_ms",
                                            "prompts", "deny_patterns", "repeats", "contract"]), json_value))))
def test_gates_yaml_parses_or_is_refused_with_a_code(tmp_path_factory: pytest.TempPathFactory, raw: Any) -> None:
    import yaml

    from uff_port.registry.gates import GatesConfig, load_gates

    path = tmp_path_factory.mktemp("gates") / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        cfg = load_gates(path)
    except CommandError as exc:
        assert exc.code == "invalid_gates" and exc.message.startswith("gates ")
    else:
        assert isinstance(cfg, GatesConfig) and cfg.latency.max_p95_ms > 0


@settings(max_examples=150, deadline=None)
@given(json_value | st.dictionaries(st.sampled_from(["latency_p95_ms", "tokens_per_s", "outputs"]), json_value))
def test_bench_results_parse_or_are_refused(tmp_path_factory: pytest.TempPathFactory, raw: Any) -> None:
    import math

    from uff_port.registry.gates import load_evidence

    path = tmp_path_factory.mktemp("bench") / "b.json"
    path.write_text(json.dumps(raw))
    try:
        ev = load_evidence(path)
    except CommandError as exc:
        assert exc.code == "invalid_args" and exc.message.startswith("bench_results")
    else:
        for value in (ev.latency_p95_ms, ev.tokens_per_s):
            assert value is None or math.isfinite(value)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_manifest_flags_parse_or_are_refused(values: list[str]) -> None:
    from uff_port.registry.federate import parse_manifest_flags

    try:
        pairs = parse_manifest_flags(values)
    except CommandError as exc:
        assert exc.code == "invalid_args" and "manifest" in exc.message
    else:
        assert len(pairs) == len(values) and all(path for _, path in pairs)


def test_resolve_by_prefix_and_alias(tmp_path: Path) -> None:
    from uff_port.registry.runmanifest import build_manifest
    from uff_port.registry.store import Registry

    run = tmp_path / "run"
    _final(run)
    manifest = build_manifest(run / "final", run_dir=run, role="ufm")
    with Registry(tmp_path / "reg") as reg:
        reg.register(run / "final", manifest)
        assert reg.resolve(manifest.artifact_id[:8].upper()) == manifest
        for ref, code in (("%%%%%%", "invalid_args"), ("abc", "invalid_args"), ("ufm:stable", "not_found"),
                          ("0" * 64, "not_found")):
            with pytest.raises(CommandError) as exc:
                reg.resolve(ref)
            assert exc.value.code == code, ref
        reg.move_aliases("ufm", {"stable": manifest.artifact_id}, {"stable": None}, "promote")
        assert reg.resolve("ufm:stable") == manifest == reg.resolve("stable", role="ufm")
        with pytest.raises(CommandError) as exc:
            reg.move_aliases("ufm", {"stable": None}, {"stable": None}, "promote")
        assert exc.value.code == "alias_conflict" and exc.value.details["actual"] == manifest.artifact_id

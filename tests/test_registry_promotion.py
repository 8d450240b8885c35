"""Registry on real artifacts of the tiny model: register, verify, gates, CAS, rollback."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_registry_fixtures import (
    PYTHON,
    ROOT,
    bench_file,
    gates_file,
    trained_run,
    uff,
    variant_run,
)

from uff_port.core.config import config_hash, load_config
from uff_port.protocol import CommandError
from uff_port.registry import commands
from uff_port.registry.gates import load_evidence, load_gates
from uff_port.registry.manifest import load_manifest
from uff_port.registry.promotion import promote, rollback
from uff_port.registry.runmanifest import write_run_manifest
from uff_port.registry.service import register_path
from uff_port.registry.store import Registry
from uff_port.server.extension_child import TaskContext

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("registry-train"))


@pytest.fixture(scope="session")
def variants(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("registry-variants")
    out = {
        "a": variant_run(run, base / "a", seed=1, eval_loss=3.0),
        "b": variant_run(run, base / "b", seed=2, eval_loss=3.02),
        "worse": variant_run(run, base / "worse", seed=3, eval_loss=4.0),
        "othertok": variant_run(run, base / "othertok", seed=4, eval_loss=2.9),
    }
    tok_cfg = out["othertok"] / "final" / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text())
    data["model_max_length"] = 4096
    tok_cfg.write_text(json.dumps(data))
    return out


def _stored(reg: Registry, run_dir: Path) -> str:
    manifest, _ = register_path(reg, run_dir)
    return manifest.artifact_id


def test_run_manifest_from_real_training(run: Path, tmp_path: Path) -> None:
    path = write_run_manifest(run)
    m = load_manifest(path)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["event"] == "finished"][-1]
    assert path == run / "final" / "artifact.json"
    assert m.role == "textgen" and m.base_model.id == "builtin:tiny-llama"
    assert m.metrics["eval_loss"] == pytest.approx(finished["eval_loss"])
    assert m.metrics["train_loss"] == pytest.approx(finished["loss"])
    assert m.lineage.attempts == 2 and m.lineage.backend == "local" and m.lineage.final_step == 4
    assert m.config_hash == config_hash(load_config(run / "config.yaml"))
    assert "adapter_model.safetensors" in m.files and "manifest.json" not in m.files
    assert m.tokenizer_hash is not None and m.interface.r == 16
    assert write_run_manifest(run).read_text() == path.read_text()  # deterministic


def test_register_verify_tamper_refuses_promotion(run: Path, tmp_path: Path) -> None:
    reg_dir = tmp_path / "reg"
    bench = bench_file(tmp_path / "bench.json")
    res = uff("register", str(run), "--registry", str(reg_dir), "--json")
    assert res.returncode == 0, res.stderr
    aid = json.loads(res.stdout)["artifact_id"]
    assert uff("artifacts", "verify", aid[:10], "--registry", str(reg_dir)).returncode == 0
    again = uff("register", str(run), "--registry", str(reg_dir), "--json")
    assert json.loads(again.stdout)["created"] is False

    weights = reg_dir / "artifacts" / aid / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit of one byte: same size, other sha256
    weights.write_bytes(bytes(blob))
    res = uff("artifacts", "verify", aid, "--registry", str(reg_dir))
    assert res.returncode == 5 and "sha256 mismatch: adapter_model.safetensors" in res.stdout
    res = uff("promote", aid, "--registry", str(reg_dir), "--bench-results", str(bench))
    assert res.returncode == 6
    assert "integrity" in res.stdout and "FAIL" in res.stdout and "REFUSED" in res.stdout
    with Registry(reg_dir) as reg:
        assert reg.aliases("textgen") == {}


def test_register_refuses_source_changed_after_manifest(run: Path, tmp_path: Path) -> None:
    src = tmp_path / "run"
    shutil.copytree(run, src, ignore=shutil.ignore_patterns("checkpoints"))
    write_run_manifest(src)
    with (src / "final" / "tokenizer.json").open("ab") as fh:
        fh.write(b" ")
    res = uff("register", str(src), "--registry", str(tmp_path / "reg"))
    assert res.returncode == 5 and "verify_failed" in res.stderr and "tokenizer.json" in res.stderr


def test_gates_pass_and_fail_on_constructed_metrics(variants: dict[str, Path], tmp_path: Path) -> None:
    gates = load_gates(gates_file(tmp_path / "gates.yaml", quality={"max_regression": 0.05}))
    good = load_evidence(bench_file(tmp_path / "good.json"))
    slow = load_evidence(bench_file(tmp_path / "slow.json", p95=9000.0, tps=1.0))
    unsafe = load_evidence(bench_file(tmp_path / "unsafe.json", outputs=["sure: rm -rf / now"]))
    with Registry(tmp_path / "reg") as reg:
        ids = {k: _stored(reg, v) for k, v in variants.items()}
        first = promote(reg, ids["a"], gates, evidence=good)
        assert first.moved and reg.aliases("textgen") == {"stable": ids["a"]}

        def failed(ref: str, ev: object) -> list[str]:
            result = promote(reg, ref, gates, evidence=ev)  # type: ignore[arg-type]
            assert not result.moved
            return [g.gate for g in result.gates if g.status == "fail"]

        assert failed(ids["worse"], good) == ["quality"]
        assert failed(ids["b"], slow) == ["latency"]
        assert failed(ids["b"], unsafe) == ["safety"]
        assert failed(ids["othertok"], good) == ["compatibility"]
        assert failed(ids["worse"], slow) == ["quality", "latency"]  # every reason, not the first
        assert reg.aliases("textgen") == {"stable": ids["a"]}
        second = promote(reg, ids["b"], gates, evidence=good)
        assert second.moved and second.replaced == ids["a"]
        assert reg.aliases("textgen") == {"stable": ids["b"], "previous": ids["a"]}


def test_cli_promote_prints_gate_table(variants: dict[str, Path], tmp_path: Path) -> None:
    reg_dir = str(tmp_path / "reg")
    for name in ("a", "worse"):
        assert uff("register", str(variants[name]), "--registry", reg_dir).returncode == 0
    bench = str(bench_file(tmp_path / "bench.json"))
    ok = uff("promote", str(load_manifest(variants["a"] / "final").artifact_id), "--registry", reg_dir,
             "--bench-results", bench)
    assert ok.returncode == 0, ok.stderr
    assert "promoted" in ok.stdout and ok.stdout.count("PASS") == 6
    worse = load_manifest(variants["worse"] / "final").artifact_id
    bad = uff("promote", worse, "--registry", reg_dir, "--bench-results", bench)
    assert bad.returncode == 6 and "REFUSED" in bad.stdout and "regresses past stable" in bad.stdout


def test_a_nan_adapter_is_refused_at_register_and_by_the_weights_gate(
    variants: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(variants["b"], src, ignore=shutil.ignore_patterns("checkpoints"))
    adapter = src / "final" / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    name = sorted(tensors)[-1]
    tensors[name].flat[-1] = float("inf")
    save_file(tensors, str(adapter))
    manifest = load_manifest(write_run_manifest(src))  # every hash matches the poisoned bytes
    with Registry(tmp_path / "reg") as reg:
        with pytest.raises(CommandError) as refused:
            register_path(reg, src)
        assert refused.value.code == "non_finite" and name in refused.value.message
        # Stored without the door check (a registry older than it, or a pulled copy):
        # promotion still reads the tensors before any alias moves.
        reg.register(src / "final", manifest)
        gates = load_gates(gates_file(tmp_path / "gates.yaml"))
        result = promote(reg, manifest.artifact_id, gates, evidence=load_evidence(bench_file(tmp_path / "b.json")))
        assert not result.moved and [g.gate for g in result.gates if g.status == "fail"] == ["weights"]
        assert "NaN/Inf in 1" in result.gates[-1].detail and reg.aliases("textgen") == {}


def test_rollback_restores_previous_release(variants: dict[str, Path], tmp_path: Path) -> None:
    gates = load_gates()
    good = load_evidence(bench_file(tmp_path / "good.json"))
    with Registry(tmp_path / "reg") as reg:
        a, b = _stored(reg, variants["a"]), _stored(reg, variants["b"])
        with pytest.raises(CommandError) as exc:
            rollback(reg)
        assert exc.value.code == "not_found"
        assert promote(reg, a, gates, evidence=good).moved
        assert promote(reg, b, gates, evidence=good).moved
        out = rollback(reg)
        assert out["stable"] == a and reg.aliases("textgen") == {"stable": a, "previous": b}
        assert [(r["action"], r["artifact_id"]) for r in reg.releases("textgen")] == [
            ("promote", a), ("promote", b), ("rollback", a)
        ]
        moves = [(r["action"], r["alias"], r["old_id"], r["new_id"]) for r in reg.audit("textgen")]
        assert moves[-2:] == [("rollback", "stable", b, a), ("rollback", "previous", a, b)]
        # a previous release that no longer verifies is never restored
        weights = reg.artifact_dir(b) / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1])
        with pytest.raises(CommandError) as exc:
            rollback(reg)
        assert exc.value.code == "verify_failed"
        assert reg.aliases("textgen") == {"stable": a, "previous": b}
    res = uff("releases", "--registry", str(tmp_path / "reg"), "--json", "--audit")
    view = json.loads(res.stdout)
    assert view["aliases"]["textgen"]["stable"] == a and len(view["audit"]) == 7


def test_two_concurrent_promotions_exactly_one_wins(variants: dict[str, Path], tmp_path: Path) -> None:
    reg_dir = tmp_path / "reg"
    with Registry(reg_dir) as reg:
        a, b = _stored(reg, variants["a"]), _stored(reg, variants["b"])
    bench = str(bench_file(tmp_path / "bench.json"))
    gates = str(gates_file(tmp_path / "gates.yaml", quality={"max_regression": 1.0}))
    for expect in ("none", None):
        if expect is None:  # second round: both start from the winner of the first
            with Registry(reg_dir) as reg:
                expect = reg.aliases("textgen")["stable"]
            with Registry(reg_dir) as reg:  # registering writes its artifact.json if no test did yet
                c_id = _stored(reg, variants["othertok"])
            contenders = [a if expect == b else b, c_id]
            gates = str(gates_file(tmp_path / "gates.yaml", quality={"max_regression": 1.0},
                                   compatibility={"enabled": False}))
        else:
            contenders = [a, b]
        procs = [
            subprocess.Popen(
                [PYTHON, "-m", "uff_port", "promote", ref, "--registry", str(reg_dir), "--expect", expect,
                 "--bench-results", bench, "--gates", gates],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for ref in contenders
        ]
        results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 7], results
        winner = contenders[[rc for rc, _ in results].index(0)]
        loser_err = next(err for rc, err in results if rc == 7)
        assert "alias_conflict" in loser_err
        with Registry(reg_dir) as reg:
            assert reg.aliases("textgen")["stable"] == winner
            promotes = [r for r in reg.audit("textgen") if r["alias"] == "stable" and r["old_id"] == (
                None if expect == "none" else expect)]
            assert len(promotes) == 1


def test_worker_commands(variants: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("a", "b", "worse"):
        shutil.copytree(variants[name], runs / name)
    bench_file(runs / "bench.json")
    ctx = TaskContext(runs_root=runs)  # the worker's own context, collecting events

    def names() -> list[str]:
        return [e["event"] for e in ctx.events]

    ids = {n: commands.register({"run_dir": n, "version": "1.0.0"}, ctx)["artifact_id"] for n in ("a", "b", "worse")}
    assert names() == ["artifact_registered"] * 3
    assert (runs / "registry" / "registry.db").is_file()  # default: inside the run root
    with pytest.raises(CommandError) as exc:
        commands.register({"run_dir": "../../etc"}, ctx)
    assert exc.value.code == "invalid_args" and "args.run_dir" in exc.value.message
    with pytest.raises(CommandError) as exc:
        commands.register({"run_dir": "a", "role": "chat"}, ctx)
    assert exc.value.code == "invalid_manifest" and "role" in exc.value.message

    ctx.events.clear()
    out = commands.promote({"artifact": ids["a"], "bench_results": "bench.json"}, ctx)
    assert out["moved"] and names()[-1] == "alias_moved" and names().count("gate_result") == 6
    commands.promote({"artifact": ids["b"], "bench_results": "bench.json", "expect": ids["a"]}, ctx)
    with pytest.raises(CommandError) as exc:
        commands.promote({"artifact": ids["worse"], "bench_results": "bench.json"}, ctx)
    assert exc.value.code == "gate_failed" and names()[-1] == "promotion_refused"
    with pytest.raises(CommandError) as exc:
        commands.promote({"artifact": ids["a"], "bench_results": "bench.json", "expect": ids["a"]}, ctx)
    assert exc.value.code == "alias_conflict"
    rolled = commands.rollback({}, ctx)
    assert rolled["stable"] == ids["a"] and ctx.events[-1]["action"] == "rollback"
    view = commands.releases({"role": "textgen"}, ctx)
    assert view["aliases"]["textgen"] == {"stable": ids["a"], "previous": ids["b"]}
    assert [r["artifact_id"] for r in view["releases"]] == [ids["a"], ids["b"], ids["a"]]
    # gates as a map (what a campaign journals with its plan): the same checks as a file's
    out = commands.promote({"artifact": ids["worse"], "to": "candidate", "bench_results": "bench.json",
                            "gates_config": {"quality": {"enabled": False}}}, ctx)
    assert out["moved"] and all(g["gate"] != "quality" or g["status"] != "fail" for g in out["gates"])
    with pytest.raises(CommandError) as exc:
        commands.promote({"artifact": ids["a"], "gates_config": {"quality": {"enabled": "maybe"}}}, ctx)
    assert exc.value.code == "invalid_gates" and "quality.enabled" in exc.value.message
    with pytest.raises(CommandError) as exc:
        commands.promote({"artifact": ids["a"], "gates": "g.yaml", "gates_config": {}}, ctx)
    assert exc.value.code == "invalid_args"
    # hostile maps from the wire: not a map, nested past the tree limit, unknown keys
    deep: dict[str, object] = {}
    for _ in range(200):
        deep = {"x": deep}
    for bad in (["quality"], "quality: {enabled: false}", {"quality": deep}, {"qualty": {"enabled": False}}):
        with pytest.raises(CommandError) as exc:
            commands.promote({"artifact": ids["a"], "gates_config": bad}, ctx)
        assert exc.value.code == "invalid_gates", bad


def test_commands_through_the_real_worker(variants: dict[str, Path], runs_root: Path, worker) -> None:  # type: ignore[no-untyped-def]
    shutil.copytree(variants["a"], runs_root / "job-a")
    bench_file(runs_root / "bench.json")
    reply = worker.call("register", {"run_dir": "job-a"}, timeout=120)
    assert reply["ok"], reply
    aid = reply["result"]["artifact_id"]
    assert worker.wait_event("artifact_registered", timeout=30)["artifact_id"] == aid
    reply = worker.call("promote", {"artifact": aid[:12], "bench_results": "bench.json"}, timeout=120)
    assert reply["ok"] and reply["result"]["moved"], reply
    moved = worker.wait_event("alias_moved", timeout=30)
    assert moved["artifact_id"] == aid and isinstance(moved["seq"], int)
    reply = worker.call("rollback", {}, timeout=60)
    assert not reply["ok"] and reply["error"]["code"] == "not_found"
    reply = worker.call("releases", {}, timeout=60)
    assert reply["result"]["aliases"] == {"textgen": {"stable": aid}}


def test_measured_benchmark_runs_the_gates(run: Path, tmp_path: Path) -> None:
    """No bench file: the gate loads base model + adapter and generates for real."""
    gates = gates_file(
        tmp_path / "gates.yaml",
        latency={"repeats": 1, "warmup": 0, "max_new_tokens": 4, "max_p95_ms": 600000, "min_tokens_per_s": 0.0},
        safety={"prompts": ["def main():"], "max_new_tokens": 4, "deny_patterns": ["^"]},
    )
    reg_dir = tmp_path / "reg"
    assert uff("register", str(run), "--registry", str(reg_dir)).returncode == 0
    aid = load_manifest(run / "final").artifact_id
    res = uff("promote", aid, "--registry", str(reg_dir), "--gates", str(gates), "--json", timeout=240)
    assert res.returncode == 6, res.stderr[-2000:]
    gates_out = {g["gate"]: g for g in json.loads(res.stdout)["gates"]}
    assert gates_out["latency"]["status"] == "pass" and "tok/s" in gates_out["latency"]["measured"]
    assert gates_out["safety"]["status"] == "fail" and "1 hits in 1 outputs" == gates_out["safety"]["measured"]


def test_cli_imports_no_torch() -> None:
    code = ("import argparse, sys, uff_port.registry.cli as c, uff_port.registry.commands; "
            "c.register(argparse.ArgumentParser().add_subparsers()); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([PYTHON, "-c", code], cwd=ROOT).returncode == 0

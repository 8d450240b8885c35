"""SLO watch against a metrics server on loopback: breach -> rollback, recovery -> nothing, no flapping."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from release_fixtures import role_artifacts
from test_registry_fixtures import bench_file, gates_file, uff

from uff_port.protocol import CommandError
from uff_port.registry import deploy as dp
from uff_port.registry.gates import load_evidence, load_gates
from uff_port.registry.manifest import ArtifactManifest
from uff_port.registry.promotion import promote
from uff_port.registry.store import Registry
from uff_port.registry.watch import Watcher, histogram_quantile, load_slo, parse_prometheus

pytestmark = pytest.mark.slow

FAST = {"0.1": 90, "0.5": 95, "1": 96, "5": 100, "+Inf": 100}  # p95 = 0.5 s
SLOW = {"0.1": 10, "0.5": 20, "1": 30, "5": 100, "+Inf": 100}  # p95 = 1 + 4 * 65/70 s


class Metrics:
    """A /metrics endpoint on 127.0.0.1 whose histogram and counters the test sets."""

    def __init__(self) -> None:
        self.buckets = FAST
        self.requests, self.errors = 0, 0
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = metrics.text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def text(self) -> str:
        lines = ["# HELP vllm:e2e_request_latency_seconds end to end latency",
                 "# TYPE vllm:e2e_request_latency_seconds histogram"]
        for le, n in self.buckets.items():
            lines.append(f'vllm:e2e_request_latency_seconds_bucket{{le="{le}",model_name="ufm"}} {n}')
            lines.append(f'vllm:e2e_request_latency_seconds_bucket{{le="{le}",model_name="ucm"}} 1')
        lines += [f'http_requests_total{{model="ufm",code="200"}} {self.requests - self.errors}',
                  f'http_requests_total{{model="ufm",code="500"}} {self.errors}',
                  f'http_errors_total{{model="ufm"}} {self.errors}']
        return "\n".join(lines) + "\n"


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.server.shutdown()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ArtifactManifest]]:
    base = tmp_path_factory.mktemp("watch")
    with Registry(base / "reg0") as reg:
        return base / "reg0", role_artifacts(reg, base, "ufm", 3, seed0=50)


def _released(tmp_path: Path, artifacts: tuple[Path, list[ArtifactManifest]]) -> tuple[Path, Path, list[str]]:
    """A fresh registry where ufm:stable = v1 (previous v0), deployed the same way."""
    src, arts = artifacts
    reg_dir, target = tmp_path / "reg", tmp_path / "serve"
    gates = load_gates(gates_file(tmp_path / "gates.yaml"))
    evidence = load_evidence(bench_file(tmp_path / "bench.json"))
    with Registry(src) as old, Registry(reg_dir) as reg:
        for m in arts:
            reg.register(old.artifact_dir(m.artifact_id), m)
        for m in arts[:2]:
            assert promote(reg, m.artifact_id, gates, evidence=evidence).moved
            dp.deploy(reg, target, {"ufm": m})
    return reg_dir, target, [m.artifact_id for m in arts]


def _slo(tmp_path: Path, url: str, **over: Any) -> Path:
    cfg = {
        "source": {"url": url}, "interval_s": 30,
        "slos": [
            {"name": "ufm_latency_p95", "role": "ufm", "metric": "vllm:e2e_request_latency_seconds",
             "labels": {"model_name": "ufm"}, "quantile": 0.95, "max": 2.0, "window_s": 60},
            {"name": "ufm_error_rate", "role": "ufm", "metric": "http_errors_total",
             "labels": {"model": "ufm"}, "divide_by": "http_requests_total", "delta": True,
             "max": 0.05, "window_s": 60},
        ],
        **over,
    }
    path = tmp_path / "slo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def test_prometheus_parsing_and_quantile() -> None:
    samples = parse_prometheus('# c\na_total{x="q\\"uote",y="1"} 3 1700000000\nb 2.5\nbad line {\nc NaN\n')
    assert samples[("a_total", (("x", 'q"uote'), ("y", "1")))] == 3.0 and samples[("b", ())] == 2.5
    assert histogram_quantile(0.95, {0.1: 90, 0.5: 95, 1.0: 96, 5.0: 100, float("inf"): 100}) == pytest.approx(0.5)
    assert histogram_quantile(0.99, {0.1: 1, float("inf"): 10}) == 0.1  # past the last bound


def test_sustained_breach_rolls_back_registry_and_host_once(
    metrics: Metrics, artifacts: tuple[Path, list[ArtifactManifest]], tmp_path: Path
) -> None:
    reg_dir, target, ids = _released(tmp_path, artifacts)
    events: list[tuple[str, dict[str, Any]]] = []
    clock = Clock()
    watcher = Watcher(load_slo(_slo(tmp_path, metrics.url)), target, reg_dir,
                      lambda e, **f: events.append((e, f)), clock=clock)

    def tick(seconds: float) -> list[dict[str, Any]]:
        clock.t += seconds
        return watcher.poll()

    metrics.requests = 1000
    assert tick(0) == []  # healthy; the error rate has no previous poll yet
    metrics.buckets, metrics.requests, metrics.errors = SLOW, 2000, 10
    assert tick(30) == [] and [e for e, _ in events] == ["slo_breached"]
    breached_at = clock.t
    assert tick(30) == []  # 30 s of a 60 s window
    metrics.requests, metrics.errors = 3000, 110  # error rate 100/1000 joins in
    [rolled] = tick(30)
    assert rolled["slo"] == "ufm_latency_p95" and rolled["since"] == breached_at
    assert rolled["value"] == pytest.approx(1 + 4 * 65 / 70) and rolled["excess"] == pytest.approx(rolled["value"] - 2.0)
    assert rolled["rolled_back"] == ids[1] and rolled["restored"] == ids[0] and rolled["registry"]["moved"]
    names = [e for e, _ in events]
    assert names == ["slo_breached", "slo_breached", "slo_rollback"]  # the error-rate SLO started at 90 s

    serving = dp.ServingDir(target)
    assert serving.link("ufm", "current") == ids[0] and ids[1] in serving.holds()
    assert dp.tree_digest(Path(os.path.realpath(target / "ufm" / "current"))) == dp.tree_digest(
        tmp_path / "reg" / "artifacts" / ids[0])
    with Registry(reg_dir) as reg:
        assert reg.aliases("ufm") == {"stable": ids[0], "previous": ids[1]}
        row = reg.audit("ufm")[-2]
        assert (row["action"], row["actor"], row["new_id"]) == ("rollback", "watch", ids[0])
        assert row["note"]["slo"] == "ufm_latency_p95" and row["note"]["since"] == breached_at
        # the rolled-back release is not deployed again without --unhold
        with pytest.raises(CommandError) as exc:
            dp.deploy(reg, target, {"ufm": reg.resolve(ids[1])})
        assert exc.value.code == "release_held"

    # still breached: nothing within the cooldown; after it a new window opens, and at its end
    # the host is not bounced back to the held release
    assert tick(30) == [] and events[-1][0] == "slo_rollback"
    assert tick(60) == [] and events[-1][0] == "slo_breached"
    assert tick(60) == [] and events[-1][0] == "slo_rollback_skipped" and "held" in events[-1][1]["reason"]
    assert serving.link("ufm", "current") == ids[0]


def test_recovery_within_the_window_does_nothing(
    metrics: Metrics, artifacts: tuple[Path, list[ArtifactManifest]], tmp_path: Path
) -> None:
    reg_dir, target, ids = _released(tmp_path, artifacts)
    events: list[str] = []
    clock = Clock()
    watcher = Watcher(load_slo(_slo(tmp_path, metrics.url)), target, reg_dir,
                      lambda e, **f: events.append(e), clock=clock)
    metrics.buckets, metrics.requests, metrics.errors = SLOW, 5000, 10
    watcher.poll()
    clock.t += 45
    metrics.buckets = FAST
    watcher.poll()
    clock.t += 60
    watcher.poll()
    assert events == ["slo_breached", "slo_recovered"]
    metrics.requests, metrics.errors = 10, 9  # counters reset (the server restarted): no judgement
    clock.t += 15
    watcher.poll()
    metrics.server.shutdown()
    metrics.server.server_close()
    clock.t += 15
    watcher.poll()
    assert events == ["slo_breached", "slo_recovered", "metrics_unreadable"]
    assert dp.ServingDir(target).link("ufm", "current") == ids[1] and dp.ServingDir(target).holds() == {}
    with Registry(reg_dir) as reg:
        assert reg.aliases("ufm")["stable"] == ids[1]


def test_json_source_and_bad_slo_files(artifacts: tuple[Path, list[ArtifactManifest]], tmp_path: Path) -> None:
    reg_dir, target, ids = _released(tmp_path, artifacts)
    data = tmp_path / "metrics.json"
    data.write_text(json.dumps({"ufm": {"latency_p95_ms": 3200.0, "tokens_per_s": 40}}))
    cfg = {"source": {"file": str(data)},
           "slos": [{"name": "p95", "role": "ufm", "metric": "ufm.latency_p95_ms", "max": 1500, "window_s": 0}]}
    (tmp_path / "slo.yaml").write_text(yaml.safe_dump(cfg))
    events: list[tuple[str, dict[str, Any]]] = []
    watcher = Watcher(load_slo(tmp_path / "slo.yaml"), target, None, lambda e, **f: events.append((e, f)),
                      hooks=dp.ReloadHooks(command="sh -c 'exit 4'"))
    [rolled] = watcher.run(max_polls=1)
    assert rolled["excess"] == 1700.0 and rolled["registry"] == {"moved": False}  # host only
    assert dp.ServingDir(target).link("ufm", "current") == ids[0]
    # the host could not reload: the rollback stands and says so
    assert [e for e, _ in events] == ["slo_breached", "slo_rollback", "reload_failed"]
    assert "exited 4" in events[-1][1]["message"]

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"source": {"url": "x", "file": "y"},
                                                       "slos": [{"name": "a", "role": "chat", "metric": "m"}]}))
    with pytest.raises(CommandError) as exc:
        load_slo(tmp_path / "bad.yaml")
    assert exc.value.code == "invalid_slo"
    problems = " ".join(exc.value.details["problems"])
    assert "exactly one of url" in problems and "unknown 'chat'" in problems


def test_cli_watch_once(metrics: Metrics, artifacts: tuple[Path, list[ArtifactManifest]], tmp_path: Path) -> None:
    reg_dir, target, ids = _released(tmp_path, artifacts)
    metrics.buckets = SLOW
    slo = _slo(tmp_path, metrics.url, slos=[{"name": "p95", "role": "ufm", "metric": "vllm:e2e_request_latency_seconds",
                                             "labels": {"model_name": "ufm"}, "quantile": 0.95, "max": 2.0,
                                             "window_s": 0}])
    res = uff("watch", "--target", str(target), "--slo", str(slo), "--registry", str(reg_dir), "--once")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["event"] for e in events] == ["slo_breached", "slo_rollback"]
    assert events[-1]["restored"] == ids[0] and events[-1]["since_utc"].endswith("Z")
    with Registry(reg_dir) as reg:
        assert reg.aliases("ufm")["stable"] == ids[0]

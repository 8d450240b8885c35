"""`uff-port eval` and `uff-port compare` as real subprocesses: sample files, resume after
SIGKILL, and the tiny model end to end (generation, an adapter run directory, A/B)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from uff_port.eval.sandbox import UID_BASE
from uff_port.eval.suites import load_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return e


def cli(env: dict[str, str], *args: str, cwd: Path = ROOT, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uff_port.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def component_samples(path: Path, prefix: str = "") -> Path:
    rows = []
    for t in load_suite("components").tasks:
        rows.append({"task_id": t.task_id, "completion": prefix + (t.canonical_solution or "")})
        rows.append({"task_id": t.task_id, "completion": prefix + "    return None\n"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_scores_a_sample_file_as_json(tmp_path: Path, env: dict[str, str]) -> None:
    samples = component_samples(tmp_path / "samples.jsonl")
    out = tmp_path / "res" / "components.json"
    proc = cli(env, "eval", "--suite", "components", "--samples", str(samples), "--k", "1,2",
               "--scorer", "parses", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert len(view["samples"]) == 24
    for s in view["samples"]:
        assert s["passed"] == (s["sample"] == 0)
        assert s["reason"] == "passed" if s["passed"] else s["reason"].startswith("failed:")
        assert s["scores"]["parses"]["score"] == 1.0
    assert set(view["by_manager"]) == {"ufm", "ucm", "urm", "ulm", "uim", "uam"}
    assert view["by_stage"]["hull"]["pass@1"] == 0.5
    saved = json.loads(out.read_text())
    assert saved["schema"] == "uff-port.eval/1" and saved["samples"][0]["completion"]
    # bad input: the file, line and field are named
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "ufm/topo_order", "completion": "x"}\n{"task_id": "nope", "completion": ""}\n')
    proc = cli(env, "eval", "--suite", "components", "--samples", str(bad), "--json", "--out", str(out))
    assert proc.returncode == 2 and f"{bad}:2: task_id: 'nope' is not a task" in proc.stderr


def sandbox_processes(evaluator: int) -> list[int]:
    """Processes running as a sandbox uid of the evaluator with pid `evaluator`."""
    first = UID_BASE + (evaluator % 1_000_000) * 64
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if first <= os.stat(f"/proc/{pid}").st_uid < first + 64:
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_a_killed_eval_resumes_where_it_stopped(tmp_path: Path, env: dict[str, str]) -> None:
    samples = component_samples(tmp_path / "slow.jsonl", prefix="    import time\n    time.sleep(0.2)\n")
    out = tmp_path / "components.json"
    journal = out.with_suffix(".samples.jsonl")
    args = ["eval", "--suite", "components", "--samples", str(samples), "--workers", "1",
            "--timeout", "3", "--json", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "uff_port.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = journal.read_text().splitlines()
    assert 5 <= len(before) < 25 and not out.exists()
    start = time.monotonic()
    done = cli(env, *args)
    assert done.returncode == 0, done.stderr
    after = journal.read_text().splitlines()
    assert after[: len(before)] == before  # what was scored stays; nothing is scored twice
    keys = [(r["task_id"], r["sample"]) for r in map(json.loads, after[1:])]
    assert len(keys) == len(set(keys)) == 24
    assert json.loads(done.stdout)["pass_at_k"]["pass@1"] == 0.5
    assert time.monotonic() - start < 60
    deadline = time.monotonic() + 10  # the killed run's executor ends at EOF after its sample
    while sandbox_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes(proc.pid) == []


def make_adapter_run(run: Path) -> None:
    """A run directory as the trainer leaves it: config.yaml and a peft adapter in final/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uff_port.training.builtin import ensure_tiny_llama

    base = ensure_tiny_llama()
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(run / "final")
    (run / "config.yaml").write_text("model:\n  name_or_path: builtin:tiny-llama\n")


@pytest.mark.slow  # two processes load torch and the tiny model (~25 s on 2 loaded cores)
def test_tiny_model_end_to_end_generation_and_compare(tmp_path: Path, env: dict[str, str]) -> None:
    common = ["--suite", "components", "--limit", "4", "--n", "2", "--k", "1,2", "--temperature", "0.8",
              "--max-new-tokens", "12", "--batch-size", "4", "--seed", "7"]
    # A/B of one model against itself: both generate with the same seeds, so the samples match
    c = cli(env, "compare", "builtin:tiny-llama", "builtin:tiny-llama", *common, "--json",
            "--out-dir", str(tmp_path / "ab"))
    assert c.returncode == 0, c.stderr[-2000:]
    view = json.loads(c.stdout)
    assert view["test"]["verdict"] == "indistinguishable" and view["test"]["p_value"] == 1.0
    assert view["test"]["test"].startswith(("mcnemar", "paired-bootstrap"))
    assert {g["group"] for g in view["groups"]} >= {"manager:ufm", "stage:foundation"}
    ra, rb = (json.loads((tmp_path / "ab" / x / "components.json").read_text()) for x in ("candidate", "baseline"))
    assert len(ra["samples"]) == 8 and all(s["reason"] for s in ra["samples"])
    assert [s["completion"] for s in ra["samples"]] == [s["completion"] for s in rb["samples"]]
    assert ra["generation"]["seed"] == 7 and ra["target"] == "builtin:tiny-llama"
    assert ra["metrics"].keys() == {"tasks", "pass@1", "pass@2"}

    # an adapter run directory: a rich table on the terminal, results in RUN/eval/<suite>.json
    run = tmp_path / "run"
    make_adapter_run(run)
    r = cli(env, "eval", str(run), *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pass@1" in r.stdout and "manager ufm" in r.stdout
    res: dict[str, Any] = json.loads((run / "eval" / "components.json").read_text())
    assert res["adapter"] == str(run / "final") and res["tasks"] == 4
    assert (run / "eval" / "components.completions.jsonl").exists()

    # registered (its manifest carries the suite's metrics), then evaluated by its id prefix
    reg_env = {**env, "UFF_PORT_REGISTRY": str(tmp_path / "registry")}
    done = cli(reg_env, "register", str(run), "--json")
    assert done.returncode == 0, done.stderr
    art = json.loads(done.stdout)
    assert art["metrics"]["eval/components/pass@1"] == res["metrics"]["pass@1"]
    r = cli(reg_env, "eval", art["artifact_id"][:12], "--suite", "ufm", "--limit", "1", "--max-new-tokens", "4",
            "--json", "--out", str(tmp_path / "by-id" / "ufm.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    by_id = json.loads((tmp_path / "by-id" / "ufm.json").read_text())
    assert by_id["target"].endswith(art["artifact_id"][:12]) and by_id["adapter"]

    missing = cli(env, "eval", str(tmp_path / "nowhere"), "--suite", "components")
    assert missing.returncode == 4 and "nowhere" in missing.stderr

"""First use: reproducible artifact ids, finished runs left alone, SIGHUP, dead-run status, early refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from uff_port.client import WorkerClient

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# A few quick steps of the tiny model; no periodic checkpoints or evals.
QUICK = ["--set", "training.max_steps=2", "--set", "checkpoint.every_steps=null", "--set", "eval.every_steps=null",
         "--set", "data.seq_len=64", "--quiet"]
WIRE_QUICK: dict[str, Any] = {"training.max_steps": 2, "checkpoint.every_steps": None, "eval.every_steps": None,
                              "data.seq_len": 64, "training.progress_every_seconds": 0.0}


def cli(*args: str, cwd: Path = ROOT, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "uff_port", *args], cwd=cwd, timeout=timeout, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


# ---- 1. deterministic artifact ids -------------------------------------------------------------

@pytest.mark.slow
def test_two_identical_runs_give_the_same_artifact_id_and_final_bytes(tmp_path: Path) -> None:
    ids = []
    for name in ("one", "two"):
        proc = cli("train", "tiny", "--run-dir", str(tmp_path / name), *QUICK)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ids.append(json.loads((tmp_path / name / "final" / "artifact.json").read_text())["artifact_id"])
    assert ids[0] == ids[1]
    one, two = tree_digest(tmp_path / "one" / "final"), tree_digest(tmp_path / "two" / "final")
    one.pop("artifact.json"), two.pop("artifact.json")  # names its run (lineage), not content
    assert one == two
    adapter = (tmp_path / "one" / "final" / "adapter_config.json").read_text()
    modules = json.loads(adapter)["target_modules"]
    assert modules == sorted(modules) and len(modules) > 1
    from uff_port.hashing import canonical_json

    assert adapter == canonical_json(json.loads(adapter))


@pytest.mark.slow
def test_a_finished_run_dir_is_left_untouched_unless_fresh(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("train", "tiny", "--run-dir", str(run), *QUICK).returncode == 0
    before = tree_digest(run / "final")
    starts = sum(1 for e in events_of(run) if e.get("event") == "state" and e.get("state") == "loading")
    again = cli("train", "tiny", "--run-dir", str(run), *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert tree_digest(run / "final") == before  # no export, no new manifest
    evs = events_of(run)
    assert any(e.get("code") == "already_finished" for e in evs)
    assert sum(1 for e in evs if e.get("event") == "state" and e.get("state") == "loading") == starts  # no model load
    assert evs[-1]["event"] == "finished" and evs[-1]["step"] == 2
    resumed = cli("resume", str(run), "--quiet")
    assert resumed.returncode == 0 and tree_digest(run / "final") == before
    fresh = cli("train", "tiny", "--run-dir", str(run), "--fresh", *QUICK)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sum(1 for e in events_of(run) if e.get("event") == "state" and e.get("state") == "loading") == starts + 1
    after = tree_digest(run / "final")
    assert after["adapter_model.safetensors"] == before["adapter_model.safetensors"]  # same training, same bytes
    assert json.loads((run / "final" / "artifact.json").read_text())["artifact_id"] == json.loads(
        (tmp_path / "run" / "final" / "artifact.json").read_text())["artifact_id"]


@pytest.mark.slow
def test_worker_reports_a_finished_run_as_finished_and_fresh_trains_again(worker: WorkerClient, runs_root: Path) -> None:
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": WIRE_QUICK})
    first = worker.wait_event("artifact", timeout=180)
    final = runs_root / "job" / "final"
    before = tree_digest(final)
    worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=30)
    n = len(worker.events)
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": WIRE_QUICK})
    second = worker.wait_event("artifact", timeout=120, since=n)
    assert second["artifact_id"] == first["artifact_id"]
    assert tree_digest(final) == before
    assert any(e.get("code") == "already_finished" for e in worker.events[n:])
    assert not any(e.get("event") == "progress" for e in worker.events[n:])
    worker.wait_event(lambda e: e.get("event") == "state" and e.get("state") == "idle", timeout=30, since=n)
    n = len(worker.events)
    worker.request("train", {"config_path": "tiny", "run_dir": "job", "overrides": WIRE_QUICK, "fresh": True})
    third = worker.wait_event("artifact", timeout=180, since=n)
    assert any(e.get("event") == "progress" and e.get("step") == 1 for e in worker.events[n:])
    assert third["artifact_id"] == first["artifact_id"]  # deterministic training: the same content id


# ---- 2. SIGHUP and the status of a dead run -----------------------------------------------------

LONG = ["--set", "training.max_steps=400", "--set", "checkpoint.every_steps=2", "--set", "eval.every_steps=null",
        "--set", "data.seq_len=64", "--set", "training.micro_batch_size=2", "--set", "training.grad_accum_steps=1",
        "--set", "training.progress_every_seconds=0"]


def wait_for(run_dir: Path, pred: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").exists():
            for ev in events_of(run_dir):
                if pred(ev):
                    return ev
        time.sleep(0.2)
    raise TimeoutError(f"no matching event in {run_dir} within {timeout}s")


def status(run_dir: Path) -> dict[str, Any]:
    proc = cli("status", str(run_dir), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _sighup_default() -> None:
    """A suite started under `nohup` passes SIGHUP ignored to its children, and the CLI rightly
    keeps an ignored SIGHUP ignored: these tests are about a terminal that can hang up."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.slow
def test_sighup_to_the_cli_process_group_checkpoints_and_exits_75(tmp_path: Path) -> None:
    run = tmp_path / "hup"
    proc = subprocess.Popen([PY, "-m", "uff_port", "train", "tiny", "--run-dir", str(run), *LONG], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_sighup_default)
    try:
        wait_for(run, lambda e: e.get("event") == "progress" and e["step"] >= 3)
        os.killpg(proc.pid, signal.SIGHUP)  # what a closed terminal or a dropped SSH session sends
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err.decode()[-3000:]
    stopped = [e for e in events_of(run) if e.get("event") == "state" and e.get("state") == "stopped"]
    assert stopped and stopped[-1]["checkpoint"], "stopped without a checkpoint"
    info = status(run)
    assert info["state"] == "stopped" and not info["alive"] and info["resumes_from_step"] == stopped[-1]["step"]


@pytest.mark.slow
def test_sighup_to_the_cli_alone_is_passed_on_and_the_trainer_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "hup1"
    proc = subprocess.Popen([PY, "-m", "uff_port", "train", "tiny", "--run-dir", str(run), "--quiet", *LONG],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_sighup_default)
    try:
        wait_for(run, lambda e: e.get("event") == "progress" and e["step"] >= 2)
        proc.send_signal(signal.SIGHUP)  # the CLI only: it must not die and leave the trainer unsaved
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err.decode()[-3000:]
    assert any(e.get("event") == "state" and e.get("state") == "stopped" and e.get("checkpoint") for e in events_of(run))


@pytest.mark.slow
def test_status_tells_a_sigkilled_trainer_from_a_running_one(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "uff_port.training", "--run-dir", str(run), "--config", "tiny", *LONG],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ckpt = wait_for(run, lambda e: e.get("event") == "checkpoint" and e.get("step", 0) >= 2)
        live = status(run)
        assert live["alive"] and live["pid"] == proc.pid and live["state"] in ("training", "checkpointing")
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    dead = status(run)
    assert dead["state"] == "dead" and not dead["alive"] and dead["pid"] is None
    assert dead["resumes_from_step"] >= ckpt["step"] and dead["resumes_from_step"] == dead["checkpoints"][-1]
    text = cli("status", str(run), timeout=60).stdout
    assert "no live trainer" in text and f"from step {dead['resumes_from_step']}" in text


# ---- 3. chat data is never dropped silently -----------------------------------------------------

def tiny_without_template(tmp: Path) -> Path:
    """A copy of the tiny model whose tokenizer ships no chat template (as base models often do)."""
    import shutil

    from uff_port.training.builtin import resolve_model_path

    out = tmp / "tiny-base"
    shutil.copytree(resolve_model_path("builtin:tiny-llama"), out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out


def chat_corpus(path: Path, n: int = 60, bad: int = 0) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"manager": "ulm" if i % 2 else "ufm", "stage": "foundation", "messages": [
            {"role": "user", "content": f"Write a function that adds {i}."},
            {"role": "assistant", "content": f"def add_{i}(x):\n    return x + {i}\n"},
        ]}))
    lines += ["{not json"] * bad
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_config(tmp: Path, model: Path, data: Path, **data_extra: Any) -> Path:
    import yaml

    cfg = {
        "model": {"name_or_path": str(model), "local_files_only": True},
        "data": {"path": str(data), "seq_len": 64, "eval_fraction": 0.0, **data_extra},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "device": "cpu",
                     "precision": "fp32", "progress_every_seconds": 0},
        "checkpoint": {"every_steps": None},
        "eval": {"every_steps": None},
    }
    path = tmp / f"chat-{len(list(tmp.glob('chat-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_without_template(tmp_path_factory.mktemp("tok")))


def test_named_chat_template_fills_in_and_masks_all_but_the_reply(base_tok: Any) -> None:
    from uff_port.core.config import DataConfig
    from uff_port.training.data import IGNORE, Tokenize

    assert not base_tok.chat_template
    msgs = [{"role": "user", "content": "add one"}, {"role": "assistant", "content": "x + 1"}]
    with pytest.raises(ValueError, match="no chat template"):
        Tokenize(base_tok, DataConfig())({"messages": msgs})
    for template in ("deepseek-coder", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                       "{% if add_generation_prompt %}[assistant] {% endif %}"):
        sample = Tokenize(base_tok, DataConfig(chat_template=template))({"messages": msgs})
        learned = base_tok.decode([t for t, lab in zip(sample.ids, sample.labels, strict=True) if lab != IGNORE])
        assert "x + 1" in learned and "add one" not in learned
    text = base_tok.decode(Tokenize(base_tok, DataConfig(chat_template="deepseek-coder"))({"messages": msgs}).ids)
    assert "### Instruction:\nadd one\n### Response:\nx + 1\n" in text


def test_a_bad_line_share_over_the_threshold_is_refused_with_the_count(tmp_path: Path, base_tok: Any) -> None:
    from uff_port.core.config import DataConfig
    from uff_port.training.data import scan_corpus

    data = chat_corpus(tmp_path / "chat.jsonl", n=60, bad=6)
    scan = scan_corpus(str(data), base_tok, DataConfig(chat_template="deepseek-coder", seq_len=64))
    assert (scan.lines, scan.bad_lines, scan.records) == (66, 6, 60)
    assert scan.managers == {"ulm": 30, "ufm": 30} and scan.formats == {"messages": 60}
    err = scan.refusal(DataConfig(chat_template="deepseek-coder"))
    assert err is not None and err.code == "too_many_bad_lines"
    assert "6 of 66 lines are bad" in err.message and "not valid JSON" in err.message and "line 61" in err.message
    assert scan.refusal(DataConfig(max_bad_line_fraction=0.1)) is None


@pytest.mark.slow
def test_chat_corpus_on_a_base_tokenizer_stops_before_training_then_trains_with_a_template(tmp_path: Path) -> None:
    model = tiny_without_template(tmp_path)
    data = chat_corpus(tmp_path / "chat.jsonl")
    proc = cli("train", str(chat_config(tmp_path, model, data)), "--run-dir", str(tmp_path / "nochat"), "--quiet")
    assert proc.returncode == 3, proc.stderr[-3000:]
    evs = events_of(tmp_path / "nochat")
    failed = next(e for e in evs if e["event"] == "failed")
    assert failed["code"] == "too_many_bad_lines" and "60 of 60 lines" in failed["message"]
    assert "no chat template" in failed["message"] and "data.chat_template" in failed["message"]
    assert not any("trainable parameters" in str(e.get("message")) for e in evs)  # the model never loaded
    assert "too_many_bad_lines" in proc.stderr
    ok = cli("train", str(chat_config(tmp_path, model, data, chat_template="deepseek-coder")),
             "--run-dir", str(tmp_path / "chat"), "--quiet")
    assert ok.returncode == 0, ok.stderr[-3000:]
    fin = events_of(tmp_path / "chat")[-1]
    assert fin["event"] == "finished" and fin["tokens_seen"] > 0


def test_scan_of_hostile_lines_counts_every_line_and_never_crashes(tmp_path_factory: pytest.TempPathFactory,
                                                                     base_tok: Any) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from uff_port.core.config import DataConfig
    from uff_port.training.data import scan_corpus

    root = tmp_path_factory.mktemp("hostile")
    record = st.one_of(
        st.binary(max_size=200).filter(lambda b: b"\n" not in b and b"\r" not in b),
        st.dictionaries(st.sampled_from(["text", "prompt", "completion", "messages", "manager", "stage"]),
                        st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2)),
                        max_size=4).map(lambda d: json.dumps(d).encode()),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(record, max_size=30))
    def check(lines: list[bytes]) -> None:
        path = root / "corpus.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        cfg = DataConfig(seq_len=32, max_line_bytes=150, eval_fraction=0.2)
        scan = scan_corpus(str(path), base_tok, cfg)
        assert scan.lines == sum(1 for b in lines if b.strip())
        assert scan.bad_lines + scan.records + scan.filtered_out == scan.lines
        assert scan.train_records + scan.eval_records <= scan.records
        assert 0.0 <= scan.bad_fraction <= 1.0

    check()


# ---- 4. early, helpful refusals -----------------------------------------------------------------

def _no_cuda() -> bool:
    from uff_port.telemetry.gpu import sample_gpus

    return not sample_gpus()


@pytest.mark.parametrize(("args", "code", "words"), [
    (["tiny", "--set", "training.max_step=3"], "invalid_config", "did you mean 'max_steps'?"),
    (["tiny", "--set", "trainng.max_steps=3"], "invalid_config", "did you mean 'training'?"),
    (["tiny", "--set", "data.chat_template=deepseek"], "invalid_config", "did you mean 'deepseek-coder'?"),
    (["tyni"], "invalid_config", "did you mean 'tiny'?"),
    (["tiny", "--set", "data.path=missing/corpus.jsonl"], "data_not_found", "no such file 'missing/corpus.jsonl'"),
    (["tiny", "--set", "training.num_epochs=1"], "invalid_config", "give max_steps or num_epochs, not both"),
    (["tiny", "--set", "data.chat_template={% for m in messages %}"], "invalid_config", "does not parse"),
])
def test_cli_refuses_early_with_a_hint_and_makes_no_run_dir(tmp_path: Path, args: list[str], code: str, words: str) -> None:
    t0 = time.monotonic()
    proc = cli("train", *args, "--run-dir", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert f"failed ({code})" in proc.stderr and words in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    assert time.monotonic() - t0 < 30  # no model was loaded
    assert "gates" not in proc.stderr  # not a training preset


@pytest.mark.skipif(not _no_cuda(), reason="this machine has a CUDA device")
def test_cli_names_no_cuda_device_for_the_6_7b_preset(tmp_path: Path) -> None:
    proc = cli("train", "deepseek-coder-6.7b-2x16gb", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 3 and "failed (not_available): no CUDA device" in proc.stderr, proc.stderr
    assert "wont_fit" not in proc.stderr and not (tmp_path / "run").exists()


def test_worker_refuses_early_with_a_hint_and_makes_no_run_dir(worker: WorkerClient, runs_root: Path) -> None:
    from uff_port.client import WorkerError

    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"config_path": "tiny", "overrides": {"training.max_step": 3}}, "invalid_config", "did you mean 'max_steps'?"),
        ({"config_path": "tinny"}, "invalid_config", "did you mean 'tiny'?"),
        ({"config_path": "tiny", "overrides": {"data.path": str(runs_root / "nope.jsonl")}}, "data_not_found",
         "no such file"),
    ]
    if _no_cuda():
        cases.append(({"config_path": "deepseek-coder-6.7b-2x16gb"}, "not_available", "no CUDA device"))
    for i, (args, code, words) in enumerate(cases):
        with pytest.raises(WorkerError) as exc:
            worker.request("train", {**args, "run_dir": f"r{i}"})
        assert exc.value.code == code and words in exc.value.message, exc.value.message
        assert not (runs_root / f"r{i}").exists()
    assert worker.request("status")["state"] == "idle"


@pytest.mark.slow
def test_trainer_refuses_a_corpus_of_the_wrong_format_before_the_model_loads(tmp_path: Path) -> None:
    data = tmp_path / "csv.jsonl"
    data.write_text("id,prompt,completion\n" + "".join(f"{i},a,b\n" for i in range(30)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: 'builtin:tiny-llama', local_files_only: true}}\n"
                   f"data: {{path: '{data}', seq_len: 64}}\ntraining: {{max_steps: 2, device: cpu}}\n")
    proc = subprocess.run([PY, "-m", "uff_port.training", "--run-dir", str(tmp_path / "run"), "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    evs = events_of(tmp_path / "run")
    failed = next(e for e in evs if e["event"] == "failed")
    assert failed["code"] == "too_many_bad_lines" and "31 of 31 lines are bad" in failed["message"]
    assert "not valid JSON" in failed["message"]
    assert not any("trainable parameters" in str(e.get("message")) for e in evs)


# ---- 5. time answers ----------------------------------------------------------------------------

def test_data_inspect_counts_records_tokens_and_steps_per_epoch(tmp_path: Path) -> None:
    data = chat_corpus(tmp_path / "chat.jsonl", n=40, bad=4)
    proc = cli("data", "inspect", str(data), "--json", "--set", "data.seq_len=64", "--set", "data.eval_fraction=0",
               "--set", "training.micro_batch_size=2", "--set", "training.grad_accum_steps=2")
    assert proc.returncode == 3, proc.stderr  # 4 of 44 bad lines: over the 5% default
    info = json.loads(proc.stdout)
    assert (info["lines"], info["records"], info["bad_lines"]) == (44, 40, 4)
    assert info["formats"] == {"messages": 40} and info["managers"] == {"ufm": 20, "ulm": 20}
    assert info["stages"] == {"foundation": 40}
    assert info["steps_per_epoch"] == -(-info["train_sequences"] // 4) and info["train_tokens"] > 0
    assert "4 of 44 lines are bad" in info["refusal"] and "data.max_bad_line_fraction" in info["refusal"]
    table = cli("data", "inspect", str(data), "--set", "data.max_bad_line_fraction=0.1")
    assert table.returncode == 0, table.stderr
    assert "steps per epoch" in table.stdout and "managers" in table.stdout and "ulm 20" in table.stdout
    missing = cli("data", "inspect", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 3 and "failed (data_not_found)" in missing.stderr


@pytest.mark.slow
def test_num_epochs_trains_the_steps_of_that_many_passes(tmp_path: Path) -> None:
    sets = ["--set", "data.seq_len=64", "--set", "training.micro_batch_size=4", "--set", "training.grad_accum_steps=2"]
    info = json.loads(cli("data", "inspect", "builtin:sample-corpus", "--json", *sets).stdout)
    run = tmp_path / "epochs"
    proc = cli("train", "tiny", "--run-dir", str(run), "--quiet", *sets, "--set", "training.max_steps=null",
               "--set", "training.num_epochs=0.1", "--set", "checkpoint.every_steps=null", "--set", "eval.every_steps=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evs = events_of(run)
    expect = -(-info["steps_per_epoch"] // 10)  # ceil(0.1 x steps per epoch)
    assert evs[-1]["event"] == "finished" and evs[-1]["step"] == expect == evs[-1]["max_steps"]
    epochs = next(e for e in evs if e.get("code") == "epochs")
    assert epochs["steps_per_epoch"] == info["steps_per_epoch"]
    again = cli("train", "tiny", "--run-dir", str(run), "--quiet", *sets, "--set", "training.max_steps=null",
                "--set", "training.num_epochs=0.1", "--set", "checkpoint.every_steps=null", "--set", "eval.every_steps=null")
    assert again.returncode == 0 and any(e.get("code") == "already_finished" for e in events_of(run))


def test_plan_config_gives_hours_per_epoch_labelled_an_estimate() -> None:
    proc = cli("plan", "--config", "deepseek-coder-6.7b-2x16gb", "--corpus-tokens", "10000000", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    epoch = json.loads(proc.stdout)["epoch"]
    cfg = epoch["config"]
    assert cfg["candidate"] == "qlora/ddpx2/ckpt/mb4" and cfg["hours_per_epoch"] > 0
    assert "estimate" in cfg["label"] and epoch["corpus_tokens"] == 10_000_000
    # tokens/s follows the planner's ranking: the faster-ranked candidate is the faster estimate
    assert epoch["recommended"]["tokens_per_s"] >= cfg["tokens_per_s"]
    text = cli("plan", "--gpus", "2x16GiB", timeout=120).stdout
    assert "h per 10M tokens" in text and "estimate" in text


def test_the_2x16gb_story_is_one_across_planner_preset_and_docs() -> None:
    from uff_port.core.config import load_config
    from uff_port.planner.guard import candidate_of

    proc = cli("plan", "--gpus", "2x16GiB", "--cpu-ram", "32GiB", "--json", timeout=120)
    pick = json.loads(proc.stdout)["recommended"]["label"]
    preset = load_config("deepseek-coder-6.7b-2x16gb")
    assert candidate_of(preset).label == pick == "qlora/ddpx2/ckpt/mb4"
    unchecked = json.loads(cli("plan", "--gpus", "2x16GiB", "--json", timeout=120).stdout)
    assert any(pick in w and "host RAM" in w for w in unchecked["warnings"])  # says where its own pick differs
    docs = (ROOT / "docs" / "training.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `deepseek-coder-6.7b-2x16gb.yaml`"))
    assert "QLoRA" in row and "DDP" in row and "micro-batch 4" in row
    assert "ZeRO-3" in docs and "--cpu-ram 32GiB" in docs


def test_canonical_json_is_one_byte_form_whatever_the_order() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from uff_port.hashing import canonical_json

    scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                       st.floats(allow_nan=False, allow_infinity=False))
    doc = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=20)

    @settings(max_examples=200, deadline=None)
    @given(doc, st.lists(st.text(max_size=6), max_size=6, unique=True), st.randoms())
    def check(body: Any, modules: list[str], rnd: Any) -> None:
        a = {"target_modules": modules, "body": body}
        shuffled = list(modules)
        rnd.shuffle(shuffled)
        b = dict(reversed(list({"body": body, "target_modules": shuffled}.items())))
        text = canonical_json(a)
        assert text == canonical_json(b) == canonical_json(json.loads(text))  # order-free and idempotent
        assert json.loads(text)["target_modules"] == sorted(modules)

    check()

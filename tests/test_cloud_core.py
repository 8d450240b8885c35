"""Cloud plane, fast parts: settings, journal, ledger, routing, plan-week, verification, secrets."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uff_port.cloud.backends.base import ProviderError
from uff_port.cloud.backends.kaggle import parse_kernel_status
from uff_port.cloud.bundle import BundleError, build_bundle, scan_for_secrets
from uff_port.cloud.credentials import kaggle_credentials, known_secrets, redact
from uff_port.cloud.journal import Journal, JournalError
from uff_port.cloud.ledger import QuotaLedger
from uff_port.cloud.routing import choose_backend, plan_week
from uff_port.cloud.settings import BudgetSettings, validate_cloud
from uff_port.cloud.verify import MANIFEST_NAME, check_pull, write_output_manifest
from uff_port.core.config import ConfigError

# Monday 2026-11-23 10:00 UTC
MONDAY = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.timezone.utc).timestamp()
H = 3600.0


# ---- settings ----------------------------------------------------------------
def test_cloud_settings_defaults_match_the_users_budget() -> None:
    s = validate_cloud({})
    assert s.budgets.kaggle_hours_per_week == 30.0
    assert s.budgets.sagemaker_hours_per_day == 4.0


def test_cloud_settings_list_every_problem_by_dotted_path() -> None:
    with pytest.raises(ConfigError) as err:
        validate_cloud(
            {"kaggle": {"session_hours": 13, "kernel_slug": "Bad Slug"}, "budgets": {"kaggle_hours_per_week": -1}, "bogus": 1}
        )
    text = "\n".join(err.value.problems)
    assert "cloud.kaggle.session_hours: must be <= 12" in text
    assert "cloud.kaggle.kernel_slug: must match" in text
    assert "cloud.budgets.kaggle_hours_per_week: must be >= 0" in text
    assert "cloud.bogus: unknown key" in text


def test_cloud_settings_spot_wait_must_cover_runtime() -> None:
    with pytest.raises(ConfigError, match="max_wait_seconds"):
        validate_cloud({"sagemaker": {"max_runtime_seconds": 7200, "max_wait_seconds": 3600}})


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@given(raw=st.one_of(_json, st.dictionaries(st.sampled_from(["budgets", "kaggle", "sagemaker", "poll", "x"]), _json)))
@settings(max_examples=150, deadline=None)
def test_cloud_settings_never_crash_on_any_input(raw: object) -> None:
    try:
        validate_cloud(raw)
    except ConfigError as exc:
        assert exc.problems and all(p.startswith("cloud") for p in exc.problems)


# ---- journal -----------------------------------------------------------------
def test_journal_is_durable_and_refuses_impossible_transitions(tmp_path: Path) -> None:
    j = Journal.open(tmp_path, "run1", "kaggle")
    j.begin_session("kaggle", "s0", now=1.0, budget_seconds=100.0)
    with pytest.raises(JournalError):
        j.transition("verified")
    with pytest.raises(JournalError, match="still submitting"):
        j.begin_session("kaggle", "s1")
    j.transition("submitted", remote_ref="ref0")
    j.transition("running")
    j.transition("interrupted")
    again = Journal.load(tmp_path)
    assert again is not None and again.current is not None
    assert again.current.state == "interrupted" and again.current.remote_ref == "ref0"
    assert [h[0] for h in again.current.history] == ["submitting", "submitted", "running", "interrupted"]
    again.transition("pulled")
    again.transition("verified", step=4)
    again.begin_session("kaggle", "s1")
    assert Journal.load(tmp_path).data.sessions[1].index == 1  # type: ignore[union-attr]


# ---- ledger ------------------------------------------------------------------
def test_ledger_windows_reservations_and_real_use(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "l.jsonl", BudgetSettings())
    lo, hi = ledger.window("kaggle", MONDAY)
    assert dt.datetime.fromtimestamp(lo, dt.timezone.utc).weekday() == 0 and hi - lo == 7 * 86400
    ledger.reserve("r:s0", "kaggle", MONDAY, 9 * H)
    assert ledger.remaining_seconds("kaggle", MONDAY) == pytest.approx(21 * H)
    ledger.record("r:s0", "kaggle", MONDAY, 2 * H)  # real use replaces the reservation
    ledger.record("r:s0", "kaggle", MONDAY, 5 * H)  # idempotent by key
    assert ledger.used_seconds("kaggle", MONDAY) == pytest.approx(2 * H)
    ledger.reserve("r:s1", "sagemaker", MONDAY, H)
    ledger.release("r:s1")
    assert ledger.used_seconds("sagemaker", MONDAY) == 0
    # A session across midnight counts in each day for its overlap.
    ledger.record("r:s2", "sagemaker", MONDAY + 13 * H, 2 * H)
    assert ledger.used_seconds("sagemaker", MONDAY) == pytest.approx(1 * H)
    assert ledger.used_seconds("sagemaker", MONDAY + 86400) == pytest.approx(1 * H)
    # A torn last line (crash mid-append) is skipped, never fatal.
    with open(tmp_path / "l.jsonl", "a") as fh:
        fh.write('{"kind": "use", "key": "r:s3", "backe')
    assert ledger.used_seconds("kaggle", MONDAY) == pytest.approx(2 * H)


@given(st.lists(st.tuples(st.sampled_from(["kaggle", "sagemaker"]), st.floats(0, 14 * 86400), st.floats(0, 20 * H)), max_size=20))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_ledger_remaining_is_bounded(tmp_path: Path, uses: list[tuple[str, float, float]]) -> None:
    ledger = QuotaLedger(None, BudgetSettings())
    for i, (backend, offset, seconds) in enumerate(uses):
        ledger.record(f"k{i}", backend, MONDAY + offset, seconds)
    for backend in ("kaggle", "sagemaker"):
        for t in (MONDAY, MONDAY + 3 * 86400, MONDAY + 10 * 86400):
            rem = ledger.remaining_seconds(backend, t)
            assert 0 <= rem <= ledger.budget_seconds(backend)
            total = sum(sec for b, _, sec in uses if b == backend)
            assert ledger.used_seconds(backend, t) <= total + 1e-6


# ---- routing -----------------------------------------------------------------
def test_hybrid_prefers_local_gpu_then_budget_and_waits_when_empty() -> None:
    s = validate_cloud({})
    ledger = QuotaLedger(None, s.budgets)
    assert choose_backend("hybrid", ledger, s, MONDAY, gpu_present=True).backend == "local"
    # Today's SageMaker hours vanish at midnight: spend them first.
    r = choose_backend("hybrid", ledger, s, MONDAY)
    assert r.backend == "sagemaker" and r.session_seconds == pytest.approx(4 * H)
    ledger.record("b", "sagemaker", MONDAY - H, 4 * H)
    r = choose_backend("hybrid", ledger, s, MONDAY)
    assert r.backend == "kaggle" and r.session_seconds == pytest.approx(9 * H)
    ledger.record("a", "kaggle", MONDAY - H, 29.9 * H)
    r = choose_backend("hybrid", ledger, s, MONDAY)
    assert r.backend is None and r.wait_until == ledger.next_reset("sagemaker", MONDAY)
    assert choose_backend("kaggle", ledger, s, MONDAY).wait_until == ledger.next_reset("kaggle", MONDAY)


def test_runs_sharing_a_ledger_take_each_backend_one_session_at_a_time() -> None:
    s = validate_cloud({})
    ledger = QuotaLedger(None, s.budgets)
    ledger.reserve("a:s0", "sagemaker", MONDAY, 2 * H)  # run a's session is running on SageMaker
    # run a itself is not blocked by its own reservation; run b goes to Kaggle instead
    assert choose_backend("hybrid", ledger, s, MONDAY + 60, run_key="a:").backend == "sagemaker"
    assert choose_backend("hybrid", ledger, s, MONDAY + 60, run_key="b:").backend == "kaggle"
    ledger.reserve("b:s0", "kaggle", MONDAY + 60, 9 * H)
    r = choose_backend("hybrid", ledger, s, MONDAY + 120, run_key="c:")
    assert r.backend is None and r.wait_until == MONDAY + 2 * H  # the first of them to end
    assert "busy" in r.reason
    # a finished session frees its backend at once (its real use replaces the reservation)
    ledger.record("a:s0", "sagemaker", MONDAY, 0.5 * H)
    assert choose_backend("hybrid", ledger, s, MONDAY + 120, run_key="c:").backend == "sagemaker"
    # an explicit backend waits for its own backend only; more sessions at once when the account allows
    assert choose_backend("kaggle", ledger, s, MONDAY + 120, run_key="c:").wait_until == MONDAY + 60 + 9 * H
    two = validate_cloud({"kaggle": {"max_concurrent_sessions": 2}})
    assert choose_backend("kaggle", ledger, two, MONDAY + 120, run_key="c:").backend == "kaggle"
    # planning (no run key) is not affected
    assert choose_backend("kaggle", ledger, s, MONDAY + 120).backend == "kaggle"


def test_plan_week_spreads_main_and_six_managers_within_budget() -> None:
    s = validate_cloud({})
    jobs = [("main", 14.0)] + [(m, 5.0) for m in ("ufm", "ucm", "urm", "ulm", "uim", "uam")]
    plan = plan_week(jobs, s, MONDAY)
    assert not plan.unscheduled
    kaggle = sum(e.hours for e in plan.entries if e.backend == "kaggle")
    assert kaggle <= 30.0 + 0.01
    for day in range(7):
        lo = MONDAY - 10 * H + day * 86400
        sm = sum(e.hours for e in plan.entries if e.backend == "sagemaker" and lo <= e.start < lo + 86400)
        assert sm <= 4.0 + 0.01
    assert all(e.hours <= 9.0 + 0.01 for e in plan.entries)
    assert {e.job for e in plan.entries} == {j for j, _ in jobs}
    assert "totals:" in plan.render()
    too_big = plan_week([("huge", 200.0)], s, MONDAY)
    assert too_big.unscheduled["huge"] > 100


# ---- Kaggle status forms -----------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ({"status": "running", "failureMessage": None}, "running"),
        ({"status": "complete"}, "completed"),
        ("KernelWorkerStatus.ERROR", "failed"),
        ("KernelWorkerStatus.CANCEL_ACKNOWLEDGED", "stopped"),
        ('"KernelWorkerStatus.QUEUED"', "queued"),
    ],
)
def test_parse_kernel_status_old_and_new_forms(raw: object, state: str) -> None:
    assert parse_kernel_status(raw)[0] == state


@given(st.text(max_size=40))
def test_parse_kernel_status_never_guesses(text: str) -> None:
    try:
        state, _ = parse_kernel_status({"status": text})
    except ProviderError:
        return
    assert state in ("queued", "running", "completed", "failed", "stopped")


# ---- verified pull -----------------------------------------------------------
def _tree(root: Path) -> Path:
    (root / "run" / "final").mkdir(parents=True)
    (root / "run" / "final" / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (root / "run" / "session.json").write_text("{}")
    write_output_manifest(root, step=3)
    return root


@pytest.mark.parametrize("how", ["alter", "truncate", "missing", "extra", "no-manifest"])
def test_pull_refuses_tampered_output(tmp_path: Path, how: str) -> None:
    root = _tree(tmp_path / "out")
    (root / "kernel.log").write_text("kaggle adds its log; not ours to verify")
    assert check_pull(root).ok
    victim = root / "run" / "final" / "adapter_model.safetensors"
    if how == "alter":
        victim.write_bytes(b"w" * 999 + b"x")
    elif how == "truncate":
        victim.write_bytes(b"w" * 10)
    elif how == "missing":
        victim.unlink()
    elif how == "extra":
        (root / "run" / "evil.py").write_text("import os")
    else:
        (root / MANIFEST_NAME).unlink()
    check = check_pull(root)
    assert not check.ok and check.reason


# ---- credentials -------------------------------------------------------------
def test_credentials_are_found_redacted_and_never_packaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "alice", "key": "kagglesecret0123456789"}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "awsSECRETabcdefghijklmnop")
    assert kaggle_credentials() == ("alice", "kagglesecret0123456789")
    assert set(known_secrets()) >= {"kagglesecret0123456789", "awsSECRETabcdefghijklmnop"}
    assert "***" in redact("token awsSECRETabcdefghijklmnop leaked") and "awsSECRET" not in redact("awsSECRETabcdefghijklmnop")
    wheel = tmp_path / "uff_port-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("uff_port/__init__.py", "")
    cfg = {"data": {"path": "builtin:sample-corpus"}, "training": {"max_steps": 2}}
    meta = build_bundle(tmp_path / "b", cfg, run_id="r", session="s", wheel=wheel)
    assert meta["wheel"] == wheel.name
    blob = b"".join(p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert b"kagglesecret" not in blob and b"awsSECRET" not in blob
    # A corpus line holding a key, a credential file as data, a wheel member: all refused.
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text(json.dumps({"text": "my key is kagglesecret0123456789"}) + "\n")
    with pytest.raises(BundleError, match="contains a credential"):
        build_bundle(tmp_path / "b2", {"data": {"path": str(leaky)}}, run_id="r", session="s", wheel=None)
    with pytest.raises(BundleError, match="credential file"):
        build_bundle(tmp_path / "b3", {"data": {"path": str(home / ".kaggle" / "kaggle.json")}}, run_id="r", session="s", wheel=None)
    bad_wheel = tmp_path / "w" / wheel.name
    bad_wheel.parent.mkdir()
    with zipfile.ZipFile(bad_wheel, "w") as zf:
        zf.writestr("uff_port/conf.py", "KEY = 'awsSECRETabcdefghijklmnop'")
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / wheel.name).write_bytes(bad_wheel.read_bytes())
    with pytest.raises(BundleError):
        scan_for_secrets(tmp_path / "w2")


# ---- commands and CLI --------------------------------------------------------
@given(st.one_of(_json, st.lists(st.fixed_dictionaries({"name": _json, "hours": _json}), max_size=3)))
@settings(max_examples=100, deadline=None)
def test_plan_week_jobs_argument_is_validated(raw: object) -> None:
    from uff_port.cloud.commands import parse_jobs
    from uff_port.protocol import CommandError

    try:
        jobs = parse_jobs(raw)
    except CommandError as exc:
        assert exc.code == "invalid_args" and exc.message.startswith("jobs")
        return
    assert all(isinstance(n, str) and 0 < h <= 1000 for n, h in jobs)


def test_plan_week_and_cloud_status_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from uff_port.cli import main

    monkeypatch.setenv("UFF_PORT_CLOUD_FAKE", str(tmp_path / "fake"))
    assert main(["plan-week", "--job", "main=10", "--job", "ufm=3", "--runs-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "main" in out and "ufm" in out and "totals:" in out
    assert main(["plan-week", "--job", "main=ten"]) == 2
    j = Journal.open(tmp_path / "r", "r", "sagemaker")
    j.begin_session("sagemaker", "uff-r-s000")
    sm = {"bucket": "b", "role_arn": "arn:aws:iam::0:role/r", "image_uri": "i"}
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump({"strategy": "sagemaker", "cloud": {"sagemaker": sm}}))
    assert main(["cloud", "pull", str(tmp_path / "r")]) == 75  # still submitting: nothing to pull
    assert main(["cloud", "status", str(tmp_path / "r")]) == 0
    assert '"state": "submitting"' in capsys.readouterr().out

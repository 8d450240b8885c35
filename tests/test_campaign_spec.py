"""Campaign spec validation (every problem by path), placement, the journal reader and status."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from uff_port.campaign.commands import campaign_plan
from uff_port.campaign.journal import JournalError, fold, iter_frames, load, read_records
from uff_port.campaign.spec import SpecError, load_spec, topo_order, validate_spec
from uff_port.cloud.ledger import QuotaLedger

MANAGERS = ("ufm", "ucm", "urm", "ulm", "uim", "uam")


def week_spec(**extra: Any) -> dict[str, Any]:
    models: list[dict[str, Any]] = [{"name": "main", "preset": "tiny", "strategy": "local", "hours": 12,
                                     "overrides": {"training.max_steps": 4}}]
    models += [{"name": m, "preset": "tiny", "parent": "main", "overrides": {"training.max_steps": 4}} for m in MANAGERS]
    return {"name": "week-48", "strategy": "hybrid", "models": models, **extra}


def problems(raw: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(raw)
    return info.value.problems


def test_the_users_week_validates_and_orders_parents_first() -> None:
    spec = validate_spec(week_spec())
    assert [m.name for m in topo_order(spec)][0] == "main"
    assert [spec.role_of(m) for m in spec.models] == ["textgen", *MANAGERS]


def test_every_problem_is_listed_by_path() -> None:
    raw = week_spec(budgets={"local_gpus": -1, "kaggle_hours_per_week": "30"}, schedule={"mode": "hourly"}, bogus=1)
    raw["models"][1]["parent"] = "nobody"
    raw["models"][2]["stages"] = ["rl"]
    raw["models"][4]["stages"] = ["sft", "rl"]
    raw["models"][3]["name"] = "Bad Name"
    out = problems(raw)
    joined = "\n".join(out)
    for path in ("budgets.local_gpus", "budgets.kaggle_hours_per_week", "schedule.mode", "bogus",
                 "models.2.stages", "models.3.name"):
        assert path in joined, (path, out)
    assert not any(p.startswith("models.4.") for p in out), out  # [sft, rl] is a valid shape
    # graph problems come once the shape is right
    raw = week_spec()
    raw["models"][1]["parent"] = "nobody"
    raw["models"][2]["role"] = "ufm"
    raw["models"][0]["parent"] = "ufm"
    raw["models"][4]["parent"] = "ulm"
    out = problems(raw)
    assert any(p.startswith("models.1.parent: 'nobody'") for p in out), out
    assert any(p.startswith("models.2.role: 'ufm' is also models.1") for p in out), out
    assert any(p.startswith("models.4.parent: a model cannot be its own parent") for p in out), out


def test_cycles_and_bad_training_configs_are_refused() -> None:
    raw = week_spec()
    raw["models"][0]["parent"] = "ufm"
    assert any("cycle" in p for p in problems(raw))
    raw = week_spec()
    raw["models"][2]["overrides"] = {"training.max_steps": -3}
    raw["models"][3]["preset"] = "no-such-preset"
    out = problems(raw)
    assert any(p.startswith("models.2.training.max_steps") for p in out), out
    assert any(p.startswith("models.3.preset: no such file") for p in out), out


def test_spec_file_limits(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("a: &x [1]\n" + "b: [" + ", ".join(["*x"] * 5000) + "]\n")
    with pytest.raises(SpecError):
        load_spec(p)
    p.write_bytes(b"\x00\x01")
    with pytest.raises(SpecError, match="binary"):
        load_spec(p)
    p.write_text(yaml.safe_dump(week_spec()))
    assert load_spec(p).name == "week-48"


_leaf = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8)
_tree = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(_tree)
def test_any_tree_is_a_spec_or_a_list_of_problems(tree: Any) -> None:
    try:
        validate_spec(tree, check_configs=False)
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and ": " in p for p in exc.problems)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["name", "strategy", "models", "budgets", "schedule", "promotion"]), _tree)
def test_a_mutated_field_never_crashes_the_parser(key: str, value: Any) -> None:
    raw = week_spec()
    raw[key] = value
    try:
        validate_spec(raw, check_configs=False)
    except SpecError as exc:
        assert exc.problems


class Ctx:
    def __init__(self, root: Path) -> None:
        self.runs_root = root

    def emit(self, event: str, **fields: Any) -> None:
        pass


def test_plan_places_jobs_and_carries_train_args(tmp_path: Path) -> None:
    plan = campaign_plan({"spec": week_spec(), "start": 1_700_000_000}, Ctx(tmp_path))
    jobs = {j["name"]: j for j in plan["jobs"]}
    assert list(jobs)[0] == "main" and jobs["main"]["backend"] == "local"
    assert {jobs[m]["backend"] for m in MANAGERS} == {"hybrid"}
    assert all(jobs[m]["deps"] == ["main"] and jobs[m]["max_steps"] == 4 for m in MANAGERS)
    assert jobs["main"]["run_dir"] == "campaigns/week-48/main"
    assert "cloud" not in jobs["main"]["train"]["overrides"]
    assert plan["placement"]["entries"]
    # a hybrid job routes each session over the clouds only, with the campaign's budgets and the runs root's ledger
    over = jobs["ufm"]["train"]["overrides"]
    assert over["strategy"] == "hybrid" and over["cloud"]["local_gpu"] == "no"
    assert over["cloud"]["ledger_path"] == str(tmp_path.resolve() / ".cloud-ledger.jsonl")
    assert over["cloud"]["budgets"]["kaggle_hours_per_week"] == 30.0


def test_plan_counts_the_hours_the_ledger_already_holds(tmp_path: Path) -> None:
    """The budgets are the account's: hours another run spent this week are not placed again."""
    start = 1_700_438_400  # a Monday 00:00 UTC
    raw = week_spec(budgets={"kaggle_hours_per_week": 20, "sagemaker_hours_per_day": 4})
    fresh = campaign_plan({"spec": raw, "start": start}, Ctx(tmp_path))
    assert any(e["backend"] == "kaggle" for e in fresh["placement"]["entries"])
    QuotaLedger(tmp_path / ".cloud-ledger.jsonl").record("other:s0", "kaggle", start, 20 * 3600)
    spent = campaign_plan({"spec": raw, "start": start}, Ctx(tmp_path))
    assert spent["placement"]["entries"] and not any(e["backend"] == "kaggle" for e in spent["placement"]["entries"])
    ufm = {j["name"]: j for j in spent["jobs"]}["ufm"]
    assert ufm["train"]["overrides"]["cloud"]["budgets"]["kaggle_hours_per_week"] == 20


RL_LORA = {"lora.r": 8, "lora.alpha": 16,
           "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}


def test_rl_stage_problems_are_listed_by_path() -> None:
    raw = week_spec()
    raw["models"][0]["stages"] = ["sft", "rl"]  # no rl config
    raw["models"][1]["rl"] = {"preset": "rl-tiny"}  # an rl config, but no rl stage
    out = problems(raw)
    assert any(p.startswith("models.0.rl: required by stages [sft, rl]") for p in out), out
    assert any(p.startswith("models.1.rl: given, but stages has no rl") for p in out), out
    # configs: an sft preset as the rl stage, a LoRA the RL adapter cannot start from, a bad rl key
    raw = week_spec()
    raw["models"][0].update(stages=["sft", "rl"], rl={"preset": "tiny"})
    raw["models"][1].update(stages=["sft", "rl"], rl={"preset": "rl-tiny"})
    raw["models"][2].update(stages=["sft", "rl"], rl={"preset": "rl-tiny", "overrides": {"rl.num_generations": 0}})
    raw["models"][2]["overrides"] = {**raw["models"][2]["overrides"], **RL_LORA}
    out = problems(raw)
    assert any(p.startswith("models.0.rl.preset: 'tiny' is a sft config") for p in out), out
    assert any(p.startswith("models.1.rl.lora: r 8") and "sft stage's r 16" in p for p in out), out
    assert any(p.startswith("models.2.rl.rl.num_generations") for p in out), out
    assert not any(p.startswith("models.2.rl.lora") for p in out), out


def test_plan_carries_the_rl_stage_and_the_gates_without_writing(tmp_path: Path) -> None:
    gates = tmp_path / "gates.yaml"
    gates.write_text("schema_version: 1\nlatency: {enabled: false}\nsafety: {enabled: false}\n")
    raw = week_spec(promotion={"gates": str(gates)})
    raw["models"][0].update(stages=["sft", "rl"], rl={"preset": "rl-tiny", "overrides": {"training.max_steps": 3}})
    raw["models"][0]["overrides"] = {**raw["models"][0]["overrides"], **RL_LORA}
    root = tmp_path / "runs"
    root.mkdir()
    plan = campaign_plan({"spec": raw, "start": 1_700_000_000}, Ctx(root))
    main = plan["jobs"][0]
    assert main["stages"] == ["sft", "rl"]
    assert main["rl"]["run_dir"] == "campaigns/week-48/main-rl" and main["rl"]["max_steps"] == 3
    assert main["rl"]["train"]["overrides"] == {"training.max_steps": 3, "strategy": "local"}
    assert plan["jobs"][1]["rl"] is None
    assert main["gates"]["latency"]["enabled"] is False and main["gates"]["quality"]["enabled"] is True
    assert list(root.iterdir()) == []  # planning writes nothing


def _frames(records: list[dict[str, Any]]) -> bytes:
    return b"".join(iter_frames(records))


def _week_records() -> list[dict[str, Any]]:
    return [
        {"kind": "campaign_started", "t": 100.0, "name": "w", "budgets": {"local_gpus": 1, "kaggle_hours_per_week": 30}},
        {"kind": "plan", "t": 100.0, "jobs": [{"name": "main", "role": "textgen", "backend": "local", "max_steps": 4},
                                               {"name": "ufm", "role": "ufm", "backend": "kaggle", "max_steps": 4}]},
        {"kind": "job", "t": 101.0, "job": "main", "state": "training"},
        {"kind": "job", "t": 3701.0, "job": "main", "state": "trained", "step": 4},
        {"kind": "job", "t": 3702.0, "job": "main", "state": "evaluated", "scores": {"humaneval": {"pass@1": 0.5}}},
        {"kind": "job", "t": 3703.0, "job": "main", "state": "promoted", "artifact_id": "a" * 64},
        {"kind": "job", "t": 3704.0, "job": "ufm", "state": "training"},
        {"kind": "job", "t": 3705.0, "job": "ufm", "state": "refused", "reason": "quality: worse", "gates": [{"gate": "quality"}]},
    ]


def test_journal_folds_into_the_campaign(tmp_path: Path) -> None:
    (tmp_path / "journal.bin").write_bytes(_frames(_week_records()))
    view = fold(load(tmp_path))
    assert view.jobs["main"].state == "promoted" and view.jobs["main"].step == 4
    assert view.jobs["main"].scores == {"humaneval": {"pass@1": 0.5}}
    assert view.jobs["ufm"].verdict == "refused" and view.jobs["ufm"].reason == "quality: worse"
    assert view.hours_used(4000.0)["local"] == pytest.approx(1.0)


def test_torn_tail_is_ignored_and_damage_before_it_is_reported(tmp_path: Path) -> None:
    data = _frames(_week_records())
    whole = len(read_records(data)[0])
    for cut in range(1, 40):  # every torn tail: a short header, a short body
        records, torn = read_records(data[:-cut])
        assert len(records) == whole - 1 and torn > 0
    garbage_last = data + struct.pack(">I", 3) + b"\xc1\xc1\xc1"
    assert read_records(garbage_last)[0] == read_records(data)[0]
    bad_middle = struct.pack(">I", 3) + b"\xc1\xc1\xc1" + data
    with pytest.raises(JournalError, match="record 0 at byte 0"):
        read_records(bad_middle)
    huge = struct.pack(">I", 1 << 30) + b"x" * 10 + data  # reaches past the end: a torn tail
    assert read_records(huge) == ([], len(huge))
    (tmp_path / "journal.bin").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(JournalError):
        load(tmp_path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_crashes_the_reader(blob: bytes) -> None:
    try:
        records, torn = read_records(blob)
    except JournalError:
        return
    assert 0 <= torn <= len(blob)
    fold_input = [r for r in records if isinstance(r, dict)]
    assert len(fold_input) == len(records)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["job", "state", "step", "t", "reason", "scores"]), _leaf, max_size=6),
                max_size=10))
def test_fold_accepts_any_record_fields(extra: list[dict[str, Any]]) -> None:
    from uff_port.campaign.journal import Journal

    records = _week_records() + [{"kind": "job", **e} for e in extra]
    view = fold(Journal(records))
    assert set(view.jobs) == {"main", "ufm"}


def test_status_cli_table_json_and_png(tmp_path: Path) -> None:
    from uff_port.cloud.journal import Journal, JournalData, Session

    outside, tmp_path = tmp_path / "outside", tmp_path / "campaign"
    tmp_path.mkdir()
    (tmp_path / "journal.bin").write_bytes(_frames(_week_records()) + b"\x00\x00")
    # a hybrid job's sessions on both clouds are billed where they ran (its RL run too, even through a link
    # inside the campaign); a run directory linked outside the campaign is not read
    Journal(tmp_path / "ufm", JournalData("ufm", "hybrid", [
        Session(0, "kaggle", "s0", state="verified", billed_seconds=3600.0),
        Session(1, "sagemaker", "s1", state="verified", started_ts=10.0, ended_ts=1810.0)])).save()
    Journal(tmp_path / "rl", JournalData("x", "kaggle", [Session(0, "kaggle", "s0", billed_seconds=7200.0)])).save()
    (tmp_path / "ufm-rl").symlink_to(tmp_path / "rl")
    Journal(outside, JournalData("y", "kaggle", [Session(0, "kaggle", "s0", billed_seconds=99.0 * 3600)])).save()
    (tmp_path / "main").symlink_to(outside)
    env_cmd = [sys.executable, "-m", "uff_port", "campaign", "status", str(tmp_path)]
    out = subprocess.run([*env_cmd, "--json", "--png", str(tmp_path / "week.png")], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["torn_tail_bytes"] == 2
    assert data["billed_hours"] == {"kaggle": 1.0 + 2.0, "sagemaker": 0.5}
    assert [j["state"] for j in data["jobs"]] == ["promoted", "refused"]
    assert (tmp_path / "week.png").read_bytes()[:4] == b"\x89PNG"
    table = subprocess.run(env_cmd, capture_output=True, text=True, check=True).stdout
    assert "promoted" in table and "GPU-hours" in table
    missing = subprocess.run([*env_cmd[:-1], str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no campaign journal" in missing.stderr
    assert msgpack  # the writer's codec is the wire's


def test_release_fuses_stable_roles_once_and_keeps_the_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from release_fixtures import role_artifacts

    from uff_port.campaign.commands import campaign_release
    from uff_port.protocol import CommandError
    from uff_port.registry.store import Registry

    monkeypatch.delenv("UFF_PORT_REGISTRY", raising=False)
    runs = tmp_path / "runs"
    with Registry(runs / "registry") as reg:
        arts = {r: role_artifacts(reg, tmp_path, r, 4) for r in ("ufm", "ucm")}
        reg.move_aliases("ufm", {"stable": arts["ufm"][0].artifact_id}, {"stable": None}, "promote")
    ctx = Ctx(runs)
    with pytest.raises(CommandError, match="none of ucm"):
        campaign_release({"roles": ["ucm"]}, ctx)
    first = campaign_release({"roles": ["ufm", "ucm"], "campaign": "w1"}, ctx)
    assert first["created"] and first["roles"] == ["ufm"] and first["missing"] == ["ucm"]
    assert first["version"] == "1.0.0" and Path(first["path"]).is_file()
    again = campaign_release({"roles": ["ufm", "ucm"]}, ctx)  # the same artifacts: the same release, once
    assert not again["created"] and again["release_id"] == first["release_id"]
    names = []
    for i in range(1, 4):  # three more weeks: only the newest three releases stay
        with Registry(runs / "registry") as reg:
            reg.move_aliases("ufm", {"stable": arts["ufm"][i].artifact_id}, {"stable": arts["ufm"][i - 1].artifact_id},
                             "promote")
        names.append(campaign_release({"roles": ["ufm"], "keep": 3}, ctx)["name"])
    kept = sorted(p.name for p in (runs / "releases").glob("*.json"))
    assert kept == sorted(f"{n}.json" for n in names)
    assert names[-1].endswith("v1.0.3")
    for bad in ({"roles": []}, {"roles": ["ufm"], "keep": 0}, {"roles": [3]}):
        with pytest.raises(CommandError):
            campaign_release(bad, ctx)

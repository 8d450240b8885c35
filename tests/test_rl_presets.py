"""RL presets of the manager adapters, and the planner's answer when a rollout does not fit:
the largest generation batch that does, and the config change that gets there (docs/rl.md)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from uff_port.core.config import load_config, training_presets

ROOT = Path(__file__).resolve().parents[1]
MANAGERS = ["ufm", "ucm", "urm", "ulm", "uim", "uam"]
GPU16 = [{"index": 0, "name": "16 GB", "memory_total": 16 * 2**30}]

_spec = importlib.util.spec_from_file_location("torture_resume", ROOT / "scripts" / "torture_resume.py")
assert _spec is not None and _spec.loader is not None
torture_resume = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("torture_resume", torture_resume)
_spec.loader.exec_module(torture_resume)


# ---- the presets ---------------------------------------------------------------------------


@pytest.mark.parametrize("m", MANAGERS)
def test_rl_adapter_preset_validates_and_fits_as_its_header_says(m: str) -> None:
    from uff_port.planner.guard import check_config
    from uff_port.training.rl import load_prompts

    name = f"adapter-{m}-grpo"
    assert name in training_presets()
    path = ROOT / "configs" / f"{name}.yaml"
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    cfg = load_config(name)
    assert cfg.stage == "rl" and cfg.rl.managers == [m] and cfg.data.managers == [m] and cfg.rl.sft_ratio > 0
    assert {t.manager for t in load_prompts(cfg)} == {m}
    report = check_config(cfg, GPU16)
    assert report.fits, report.message
    said = re.search(r"Hardware: one 16 GB GPU.*Memory \(planner\): ([\d.]+) GiB", header, re.S)
    assert said, header
    assert report.estimate is not None
    assert float(said.group(1)) == round(sum(report.estimate["gpu"].values()) / 2**30, 1)


@pytest.mark.parametrize("name", ["deepseek-coder-1.3b-grpo-16gb", "deepseek-coder-6.7b-grpo-qlora-16gb"])
def test_grpo_preset_headers_carry_the_planners_estimate(name: str) -> None:
    from uff_port.planner.guard import check_config

    header = (ROOT / "configs" / f"{name}.yaml").read_text()
    said = re.search(r"Memory \(planner[^)]*\): ([\d.]+) GiB of 16", header)
    report = check_config(load_config(name), GPU16)
    assert said and report.fits and report.estimate is not None, report.message
    assert float(said.group(1)) == round(sum(report.estimate["gpu"].values()) / 2**30, 1)


def test_one_rl_adapter_trains_on_cpu(tmp_path: Path) -> None:
    """adapter-ufm-grpo, shrunk to the tiny model: a generation batch scored by the ufm tasks'
    tests in the sandbox, its two updates (the preset's rl.iterations) with a supervised step of
    the mix on the ufm records between them."""
    cfg = load_config("adapter-ufm-grpo", {
        "model.name_or_path": "builtin:tiny-llama", "model.local_files_only": True,
        "model.gradient_checkpointing": False, "data.seq_len": 64, "training.device": "cpu",
        "training.max_steps": 3, "training.micro_batch_size": 4, "training.warmup_steps": 0,
        "training.cpu_threads": 1, "training.progress_every_seconds": 0, "checkpoint.every_steps": None,
        "checkpoint.every_seconds": None, "eval.every_steps": None, "eval.max_batches": 1, "output.plot": False,
        "rl.prompts_per_step": 2, "rl.num_generations": 2, "rl.max_prompt_tokens": 48, "rl.max_new_tokens": 8,
        "rl.sft_ratio": 0.5, "rl.reward_workers": 2,
    })  # fmt: skip
    run = tmp_path / "run"
    proc = torture_resume.start(run, torture_resume.write_config(run, cfg.to_dict()))
    assert proc.wait(180) == 0, (run / "events.jsonl").read_text()[-3000:]
    events = torture_resume.read_events(run)
    progress = {e["step"]: e for e in events if e.get("event") == "progress"}
    assert [progress[s]["stage"] for s in (1, 2, 3)] == ["rl", "sft", "rl"]
    assert progress[1]["reward"] == progress[3]["reward"]  # the same batch, updated twice
    (rollout,) = [e for e in events if e.get("event") == "rollout"]
    assert rollout["step"] == 3
    assert rollout["completions"] == 4 and rollout["pass_rate"] is not None  # the tests ran in the sandbox
    assert set(rollout["rewards"]) == {"tests", "parses", "forbidden"}
    assert (run / "final" / "adapter_model.safetensors").is_file()


# ---- the planner: the largest rollout that fits ------------------------------------------


def _totals(name: str, overrides: dict[str, Any], rows: list[int]) -> tuple[list[int], Any]:
    """GPU estimate of `name` at each rollout size, the update shape unchanged."""
    from dataclasses import replace

    from uff_port.planner.arch import resolve_arch
    from uff_port.planner.estimate import estimate
    from uff_port.planner.guard import candidate_of, workload_of

    cfg = load_config(name, overrides)
    arch = resolve_arch(cfg.model.name_or_path, cfg.model.revision)
    wl, cand = workload_of(cfg, True), candidate_of(cfg)
    return [estimate(arch, cand, replace(wl, rollout_rows=n)).gpu_total for n in rows], (cfg, arch, wl, cand)


def test_rollout_term_grows_by_one_rows_kv_cache_and_logits() -> None:
    """Past the update's working set, each more row costs its KV cache at full length plus
    its fp32 logits and softmax: 2 x layers x kv_dim x 2 B x (prompt + new) + 2 x 4 B x vocab."""
    ov = {"rl.max_new_tokens": 1536}
    totals, (cfg, arch, _, _) = _totals("deepseek-coder-1.3b-grpo-16gb", ov, [100, 101, 102])
    per_row = 2 * 24 * 2048 * 2 * (512 + 1536) + 2 * 4 * 32256
    assert (arch.layers, arch.kv_dim, arch.vocab) == (24, 2048, 32256)
    assert totals[1] - totals[0] == totals[2] - totals[1] == per_row


def test_rollout_limit_is_the_largest_batch_that_fits() -> None:
    """The bisection agrees with a scan of every size, on both sides of the edge."""
    from uff_port.planner.guard import rollout_limit
    from uff_port.planner.search import DEFAULT_MARGIN

    ov = {"rl.num_generations": 64, "rl.max_new_tokens": 1536}
    totals, (cfg, arch, wl, cand) = _totals("deepseek-coder-1.3b-grpo-16gb", ov, list(range(1, 129)))
    usable = 16 * 2**30 * (1 - DEFAULT_MARGIN)
    scan = max(n for n, t in zip(range(1, 129), totals, strict=True) if t <= usable)
    limit = rollout_limit(arch, cand, wl, 16 * 2**30, None, cfg.rl.prompts_per_step, cfg.rl.num_generations)
    assert limit.rows == scan == 28
    assert totals[scan - 1] <= usable < totals[scan]
    assert (limit.num_generations, limit.prompts_per_step) == (14, None)  # 2 x 14 = 28; one prompt of 64: no


def test_rollout_overrides_keep_the_group_size_first() -> None:
    from uff_port.planner.guard import RolloutLimit, rollout_overrides

    assert rollout_overrides(RolloutLimit(40, 5, 2), 8, 16, 8) == {"rl.prompts_per_step": 2}
    assert rollout_overrides(RolloutLimit(28, 14, None), 2, 64, 8) == {"rl.prompts_per_step": 1,
                                                                         "rl.num_generations": 28}
    # a generation batch smaller than the update's micro-batch is refused at validation: capped
    assert rollout_overrides(RolloutLimit(6, 3, None), 2, 8, 8) == {
        "rl.prompts_per_step": 1, "rl.num_generations": 6, "training.micro_batch_size": 6}
    assert rollout_overrides(RolloutLimit(1, None, None), 2, 8, 8) is None
    assert rollout_overrides(RolloutLimit(16, 8, 2), 2, 8, 8) == {}  # it fits as it is


@pytest.mark.parametrize(("overrides", "named", "fix"), [
    ({"rl.num_generations": 64, "rl.max_new_tokens": 1536}, "largest rl.num_generations 14",
     {"rl.prompts_per_step": 1, "rl.num_generations": 28}),
    ({"rl.prompts_per_step": 8, "rl.num_generations": 16, "rl.max_new_tokens": 1024},
     "rl.prompts_per_step 2 (at G 16)", {"rl.prompts_per_step": 2}),
    # the update does not fit either: its nearest shape, and the rollout that fits with it
    ({"rl.num_generations": 64, "rl.max_new_tokens": 1536, "training.micro_batch_size": 32,
      "model.gradient_checkpointing": False}, "fits with at most 27 completions",
     {"model.gradient_checkpointing": True, "training.micro_batch_size": 16, "training.grad_accum_steps": 2,
      "rl.prompts_per_step": 1, "rl.num_generations": 27}),
])  # fmt: skip
def test_a_rollout_that_does_not_fit_is_refused_with_the_change_that_fits(
        overrides: dict[str, Any], named: str, fix: dict[str, Any]) -> None:
    from uff_port.planner.guard import check_config

    report = check_config(load_config("deepseek-coder-1.3b-grpo-16gb", overrides), GPU16)
    assert not report.fits and named in report.message, report.message
    assert report.nearest_fit == fix and report.details["rollout"]["overrides"] == fix
    fixed = check_config(load_config("deepseek-coder-1.3b-grpo-16gb", {**overrides, **fix}), GPU16)
    assert fixed.fits, fixed.message


def test_a_rollout_too_long_for_even_one_pair_says_so() -> None:
    from uff_port.planner.guard import check_config

    report = check_config(load_config("deepseek-coder-1.3b-grpo-16gb", {
        "rl.max_new_tokens": 32000}), GPU16)
    assert not report.fits and "even at 1 prompt x G 2" in report.message, report.message
    assert report.details["rollout"]["overrides"] is None


def test_plan_offers_the_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from uff_port.cli import main

    big = load_config("deepseek-coder-1.3b-grpo-16gb", {"rl.num_generations": 64, "rl.max_new_tokens": 1536})
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(big.to_dict()))
    assert main(["plan", "--config", str(path)]) == 0  # a recommendation exists; the config's row says no
    out = capsys.readouterr().out
    assert f"to fit: uff-port train {path} --set rl.prompts_per_step=1 --set rl.num_generations=28" in out, out
    main(["plan", "--config", str(path), "--json"])
    row = json.loads(capsys.readouterr().out)["epoch"]["config"]
    assert row["fits"] is False and row["nearest_fit"] == {"rl.prompts_per_step": 1, "rl.num_generations": 28}
    assert row["rollout"]["num_generations"] == 14

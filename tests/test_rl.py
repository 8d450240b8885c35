"""The RL stage (docs/rl.md): config checks, GRPO arithmetic, exact resume after real SIGKILLs,
and a run stopped and resumed through the real worker."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from uff_port.core.config import ConfigError, config_hash, validate_config

_spec = importlib.util.spec_from_file_location(
    "torture_resume", Path(__file__).resolve().parents[1] / "scripts" / "torture_resume.py"
)
assert _spec is not None and _spec.loader is not None
torture_resume = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("torture_resume", torture_resume)
_spec.loader.exec_module(torture_resume)


def rl_config(max_steps: int = 8, **rl: Any) -> dict[str, Any]:
    """Tiny and fast; two updates per batch, a KL term, dropout and an SFT share, so that
    the stored batch, both RNGs and both data cursors must all be restored exactly."""
    return {
        "name": "rl-test",
        "stage": "rl",
        "model": {"name_or_path": "builtin:tiny-llama", "local_files_only": True},
        "data": {"path": "builtin:sample-corpus", "seq_len": 64, "eval_fraction": 0.05},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "training": {"max_steps": max_steps, "seed": 7, "micro_batch_size": 4, "grad_accum_steps": 1,
                     "learning_rate": 0.01, "warmup_steps": 0, "lr_scheduler": "constant", "device": "cpu",
                     "precision": "fp32", "progress_every_seconds": 0, "cpu_threads": 1},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "eval": {"every_steps": None, "max_batches": 1},
        "output": {"plot": False},
        "rl": {"prompts": "components", "prompts_per_step": 2, "num_generations": 4, "max_prompt_tokens": 48,
               "max_new_tokens": 8, "iterations": 2, "kl_beta": 0.05, "sft_ratio": 0.25,
               "rewards": [{"name": "format", "options": {"pattern": "^\\s"}},
                           {"name": "length", "weight": 0.5, "options": {"budget": 20, "shaped": True}}],
               **rl},
    }


# ---- config -------------------------------------------------------------------------


def test_sft_configs_keep_their_hash_and_rl_is_checked() -> None:
    plain = validate_config({})
    assert "rl" not in plain.to_dict() and "stage" not in plain.to_dict()
    assert config_hash(plain) == config_hash(validate_config({"stage": "sft"}))
    cfg = validate_config(rl_config())
    assert cfg.stage == "rl" and cfg.rl.iterations == 2 and config_hash(cfg) != config_hash(plain)
    cases = {
        "rl: set, but stage is sft": {"rl": {"iterations": 2}},
        "rl.prompts_per_step: 3 must be divisible": {**rl_config(prompts_per_step=3), "distributed": {"nproc": 2},
                                                     "training": {**rl_config()["training"], "grad_accum_steps": 2}},
        "distributed.backend: stage rl does not run under DeepSpeed": {**rl_config(), "distributed": {
            "backend": "deepspeed"}},
        "lora.enabled": {**rl_config(), "lora": {"enabled": False}},
        "rl.rewards": {**rl_config(rewards=[])},
        "rl.rewards.0: reward format: option 'pattern'": {**rl_config(rewards=[{"name": "format"}])},
        "rl.num_generations: must be >= 2": {**rl_config(num_generations=1)},
    }
    for needle, raw in cases.items():
        with pytest.raises(ConfigError) as err:
            validate_config(raw)
        assert any(p.startswith(needle) or needle in p for p in err.value.problems), (needle, err.value.problems)
    two = validate_config(two_rank_config())  # DDP on two processes: each generates for half the prompts
    assert two.distributed.nproc == 2 and two.stage == "rl"


def two_rank_config(max_steps: int = 6) -> dict[str, Any]:
    """rl_config on two processes (DDP, gloo on CPU): one prompt's group per rank and batch."""
    cfg = rl_config(max_steps=max_steps)
    cfg["distributed"] = {"nproc": 2, "backend": "ddp"}
    cfg["training"]["grad_accum_steps"] = 2  # the SFT share's global batch: one micro-batch per rank
    return cfg


def test_a_checkpoint_resumes_only_with_the_world_size_that_saved_it() -> None:
    """Every rank's sampler and pending batch are in it: other ranks would have none to continue."""
    import torch

    from uff_port.training.errors import TrainError
    from uff_port.training.rl import PromptStream, RLCursor

    def cursor(rank: int, world: int) -> RLCursor:
        gen = torch.Generator()
        gen.manual_seed(100 + rank)
        return RLCursor(PromptStream(list(range(5)), seed=1), gen, None, 0, rank, world)

    one = cursor(0, 1).state_dict()
    two = {k: v for k, v in one.items() if k not in ("sampler", "batch")}
    two["ranks"] = [{"sampler": cursor(r, 2).state_dict()["sampler"], "batch": None} for r in range(2)]
    second = cursor(1, 2)
    second.sampler.manual_seed(0)
    second.load_state_dict(two)
    assert torch.equal(second.sampler.get_state(), cursor(1, 2).sampler.get_state())
    for state, c in ((two, cursor(0, 1)), (one, cursor(0, 2))):
        with pytest.raises(TrainError) as err:
            c.load_state_dict(state)
        assert err.value.code == "data_cursor_mismatch" and "distributed.nproc" in err.value.message


def test_sft_steps_are_spread_evenly() -> None:
    from uff_port.training.rl import is_sft_step

    assert [s for s in range(1, 11) if is_sft_step(s, 0.3)] == [4, 7, 10]
    assert not any(is_sft_step(s, 0.0) for s in range(1, 50))
    assert sum(is_sft_step(s, 0.25) for s in range(1, 101)) == 25


def test_group_advantages_are_normalised_per_group() -> None:
    import torch

    from uff_port.training.rl import group_advantages

    adv = torch.tensor(group_advantages([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], 4))
    assert abs(float(adv[:4].mean())) < 1e-9 and float(adv[0]) > 0 > float(adv[1])
    assert torch.all(adv[4:] == 0)  # a group with one reward teaches nothing


# ---- exact resume ---------------------------------------------------------------------


def _steps(run_dir: Path) -> dict[int, list[tuple[float, float | None]]]:
    out: dict[int, list[tuple[float, float | None]]] = {}
    for e in torture_resume.read_events(run_dir):
        if e.get("event") == "progress":
            out.setdefault(int(e["step"]), []).append((e["loss"], e.get("reward")))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, tuple[float, float | None]], str]:
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = torture_resume.start(run, torture_resume.write_config(run, rl_config()))
    assert proc.wait(300) == 0, (run / "events.jsonl").read_text()[-3000:]
    steps = {s: v[-1] for s, v in _steps(run).items()}
    assert sorted(steps) == list(range(1, 9))
    assert [s for s, (_, r) in steps.items() if r is None] == [4, 8]  # the SFT share
    return steps, torture_resume.adapter_sha(run)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_in_every_phase_resumes_bit_for_bit(tmp_path: Path, reference: Any) -> None:
    """Kills in generation, reward scoring, the update and mid-commit; then the run finishes."""
    steps, sha = reference
    run = tmp_path / "run"
    config = torture_resume.write_config(run, rl_config())
    kills = [
        {"UFF_PORT_RL_KILL_AT": "2:update"},  # before any checkpoint: from scratch again
        {"UFF_PORT_RL_KILL_AT": "5:update"},  # checkpoint 3 holds batch 2 half-used
        {torture_resume.KILL_AT_ENV: "6:files_synced"},  # a commit torn half-way
        {"UFF_PORT_RL_KILL_AT": "6:generation"},
        {"UFF_PORT_RL_KILL_AT": "6:rewards"},
        {"UFF_PORT_RL_KILL_AT": "7:update"},  # checkpoint 6 holds batch 3 half-used
    ]
    for env in kills:
        proc = torture_resume.start(run, config, env)
        assert proc.wait(300) == -signal.SIGKILL, env
    assert torture_resume.start(run, config).wait(300) == 0
    seen = _steps(run)
    assert sorted(seen) == list(range(1, 9))
    bad = [(s, v, steps[s]) for s, vs in seen.items() for v in vs if v != steps[s]]
    assert bad == []
    assert sum(len(v) for v in seen.values()) > 8  # steps really were replayed after the kills
    assert torture_resume.adapter_sha(run) == sha


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_sigkilled_mid_update_resume_bit_for_bit(tmp_path: Path) -> None:
    """Two ranks under torchrun (gloo); the whole group SIGKILLed in the update of step 5, when
    checkpoint 3 holds the half-used generation batch of each rank: the resumed run's reward
    and loss equal the uninterrupted two-rank run's at every step, and so does the adapter."""
    ref = tmp_path / "ref"
    assert torture_resume.start(ref, torture_resume.write_config(ref, two_rank_config())).wait(200) == 0
    want = {s: v[-1] for s, v in _steps(ref).items()}
    assert sorted(want) == list(range(1, 7)) and want[4][1] is None  # step 4 is the SFT share
    rollouts = [e for e in torture_resume.read_events(ref) if e.get("event") == "rollout"]
    assert rollouts and all(e["completions"] == 8 for e in rollouts)  # global: both ranks' completions
    run = tmp_path / "run"
    config = torture_resume.write_config(run, two_rank_config())
    killed = torture_resume.start(run, config, {"UFF_PORT_RL_KILL_AT": "5:update"})
    assert killed.wait(200) == -signal.SIGKILL
    state = json.loads((run / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert [r["batch"]["done"] for r in state["data_cursor"]["ranks"]] == [1, 1]
    assert torture_resume.start(run, config).wait(200) == 0
    seen = _steps(run)
    assert sorted(seen) == list(range(1, 7)) and len(seen[4]) == 2  # step 4 ran again after the kill
    assert [(s, v) for s, vs in seen.items() for v in vs if v != want[s]] == []
    assert torture_resume.adapter_sha(run) == torture_resume.adapter_sha(ref)


@pytest.mark.long
@pytest.mark.timeout(600)
def test_two_ranks_sigterm_checkpoints_and_resume_bit_for_bit(tmp_path: Path) -> None:
    """SIGTERM to the launcher of a two-rank RL run: both ranks agree at the next boundary,
    checkpoint (every rank's sampler in it) and exit 75; the resumed run equals the
    uninterrupted one at every step."""
    import time

    cfg = two_rank_config(max_steps=9)
    cfg["checkpoint"]["every_steps"] = None
    ref = tmp_path / "ref"
    assert torture_resume.start(ref, torture_resume.write_config(ref, cfg)).wait(300) == 0
    run = tmp_path / "run"
    config = torture_resume.write_config(run, cfg)
    proc = torture_resume.start(run, config)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and max(_steps(run) or {0: []}) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 75
    stopped = [e for e in torture_resume.read_events(run) if e.get("state") == "stopped"][-1]
    assert 3 <= stopped["step"] < 9 and stopped["checkpoint"]
    assert torture_resume.start(run, config).wait(300) == 0
    want = {s: v[-1] for s, v in _steps(ref).items()}
    seen = _steps(run)
    assert sorted(seen) == list(range(1, 10))
    assert [(s, v) for s, vs in seen.items() for v in vs if v != want[s]] == []
    assert torture_resume.adapter_sha(run) == torture_resume.adapter_sha(ref)


# ---- learning ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mean_reward_rises_on_the_toy_task(tmp_path: Path) -> None:
    """configs/rl-tiny.yaml: the reward of the last batches beats the first ones'."""
    from uff_port.core.config import load_config_file
    from uff_port.training.rl import rollout_rewards

    cfg = load_config_file("rl-tiny")
    run = tmp_path / "run"
    proc = torture_resume.start(run, torture_resume.write_config(run, cfg))
    assert proc.wait(600) == 0
    rewards = [r for _, r in sorted(rollout_rewards(run).items())]
    k = len(rewards) // 4
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last > first + 0.3, (first, last)


@pytest.mark.slow
@pytest.mark.long  # a figure (docs/rl.md), 1-2 min; the SFT steps of the mix are in the SIGKILL test
@pytest.mark.timeout(600)
def test_sft_share_keeps_the_sft_loss_from_drifting_up(tmp_path: Path) -> None:
    """rl-tiny with sft_ratio 0.5: the reward still rises and the held-out SFT loss does not.

    Without the share the same run's held-out loss ends near 34 nats/token (the toy reward
    pulls every position towards whitespace); with 0.3 it still creeps up (docs/rl.md).
    """
    from uff_port.core.config import apply_overrides, load_config_file
    from uff_port.training.rl import rollout_rewards

    cfg = apply_overrides(load_config_file("rl-tiny"),
                          {"training.max_steps": 50, "rl.sft_ratio": 0.5, "eval.every_steps": 10,
                           "training.progress_every_seconds": 0})  # a progress event for every step
    run = tmp_path / "run"
    assert torture_resume.start(run, torture_resume.write_config(run, cfg)).wait(600) == 0
    events = torture_resume.read_events(run)
    assert sum(e.get("event") == "progress" and e.get("stage") == "sft" for e in events) == 25
    evals = [e["loss"] for e in events if e.get("event") == "eval" and e.get("loss") is not None]
    assert len(evals) == 5 and evals[-1] <= evals[0] + 0.1, evals
    rewards = [r for _, r in sorted(rollout_rewards(run).items())]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15, rewards


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rl_run_stopped_and_resumed_through_the_worker(tmp_path: Path) -> None:
    from uff_port.client import WorkerClient

    root = tmp_path / "runs"
    root.mkdir()
    cfg = rl_config(max_steps=12)
    cfg["checkpoint"]["every_steps"] = None
    with WorkerClient(runs_root=root, env=torture_resume.child_env()) as w:
        w.request("train", {"config": cfg, "run_dir": "rl"}, timeout=60)
        w.wait_event(lambda e: e.get("event") == "progress" and e.get("step", 0) >= 3, timeout=300)
        status = w.request("status")
        assert status["state"] in ("training", "generating", "scoring") and status["job_id"] == "rl"
        stopped = w.request("stop", timeout=200)
        assert stopped["exit_status"] == 75 and stopped["checkpoint"]
        again = w.request("train", {"config": cfg, "run_dir": "rl"}, timeout=60)
        assert again["resumed_from"] == stopped["step"]
        done = w.wait_event(lambda e: e.get("event") in ("finished", "failed"), timeout=300)
        assert done["event"] == "finished" and done["step"] == 12
        w.shutdown()
    seen = _steps(root / "rl")
    assert sorted(seen) == list(range(1, 13))
    assert len({v for vs in seen.values() for v in vs}) == sum(1 for _ in seen)  # replays agree
    assert any(e.get("event") == "rollout" for e in torture_resume.read_events(root / "rl"))
    assert (root / "rl" / "final" / "adapter_model.safetensors").is_file()


def test_planner_counts_the_rollout_kv_cache() -> None:
    """A generation batch whose KV cache outgrows the update's working set raises the estimate."""
    from uff_port.core.config import load_config
    from uff_port.planner.guard import check_config

    gpu = [{"index": 0, "name": "16 GB", "memory_total": 16 * 2**30}]
    base = load_config("deepseek-coder-1.3b-grpo-16gb")
    ok = check_config(base, gpu)
    assert ok.fits and ok.estimate["gpu"]["rollout_kv_cache"] == 0
    big = load_config("deepseek-coder-1.3b-grpo-16gb", {"rl.num_generations": 64, "rl.max_new_tokens": 1536})
    report = check_config(big, gpu)
    assert not report.fits and "will not fit" in report.message, report.message
    kv = report.estimate["gpu"]["rollout_kv_cache"]
    assert kv > 30 * 2**30  # 2 x 24 layers x 2048 x 2 B x 128 rows x 2048 tokens, less the update's part

"""The RL recipe (`stage: rl`): GRPO on rewards computed from the completions (docs/rl.md).

It is the SFT recipe (`Trainer`) with another step: model and LoRA loading, the
engine's optimizer and schedule, checkpoints, control words, events and SIGTERM
grace are the parent's. What is RL's own:

- A generation batch: `rl.prompts_per_step` prompts from the suite, G =
  `rl.num_generations` completions each, sampled with a KV cache from a
  `torch.Generator` seeded from `training.seed` (never the global RNG, so dropout
  and sampling do not share a stream).
- Rewards (`rewards.Rewards`): the weighted sum of the configured functions;
  advantages are normalised within each prompt's group, (r - mean) / (std + 1e-4),
  as in TRL's GRPO.
- Loss: PPO's clipped surrogate per completion token, plus `kl_beta` times the k3
  estimate of KL(policy || reference), the reference being the same weights with the
  LoRA adapter disabled (`disable_adapter()`: no second copy of the model). Summed
  over every completion token of the batch and divided by their number (token-level
  normalisation, TRL's `dapo`/`bnpo` family), so micro-batching does not change it.
- `rl.iterations` optimizer steps per generation batch; the log-probabilities of the
  policy that sampled (`old`) are computed once, before the first of them.
- `rl.sft_ratio`: that share of optimizer steps are supervised steps on the SFT
  corpus, interleaved, through the SFT recipe's own step.

Exact resume: the data cursor of a checkpoint (`RLCursor.state_dict`) holds the
prompt cursor, the sampler's generator state, the SFT stream's cursor and, when the
checkpoint falls between the steps of one generation batch, that batch (tokens,
rewards, advantages, old and reference log-probabilities) and how many of its steps
are done. A restart continues with the very same samples; a batch abandoned before
its first step ends is regenerated from the saved generator state, which on CPU is
the same batch bit for bit.

On N processes (DDP, `distributed.nproc`): the prompt cursor is global and the same
on every rank; rank r generates for its own `prompts_per_step / N` prompts of the
batch (whole groups, so advantages see the whole group), scores them, and the update's
gradient is all-reduced by DDP over every completion token of every rank. Each rank's
sampler and pending batch are gathered into the checkpoint's cursor (`ranks`), as the
RNG of every rank is; events carry global figures, from rank 0.
"""

from __future__ import annotations

import base64
import math
import os
import random
import signal
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import torch

from uff_port.core.config import Config
from uff_port.protocol.errors import ErrorCode
from uff_port.training import dist
from uff_port.training.channel import Command
from uff_port.training.control import STOP, STOP_NOSAVE
from uff_port.training.data import PackedStream
from uff_port.training.errors import NonFiniteStep, TrainError
from uff_port.training.trainer import Trainer

# Test hook: `STEP:PHASE` makes the trainer SIGKILL itself in that phase of that step
# (generation, rewards, update), so a torture test lands kills exactly there.
KILL_AT_ENV: Final = "UFF_PORT_RL_KILL_AT"
CURSOR_VERSION: Final = 1
_ADV_EPS: Final = 1e-4


class _Abandon(Exception):
    """A stop arrived mid-step: the step is dropped and replayed after the resume."""

    def __init__(self, want: int) -> None:
        self.want = want


# ---- prompts ------------------------------------------------------------------


class PromptStream:
    """The suite's tasks in a seeded order per epoch; the cursor is (epoch, index)."""

    def __init__(self, tasks: list[Any], seed: int) -> None:
        self.tasks = tasks
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(len(self.tasks)))
        random.Random(f"uff-port-rl-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._perm(self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "tasks": len(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["tasks"]) != len(self.tasks):
            raise TrainError(ErrorCode.DATA_CURSOR_MISMATCH, f"rl.prompts: the checkpoint's cursor is for "
                             f"{state['tasks']} tasks, the suite now has {len(self.tasks)}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._perm(self.epoch)


def load_prompts(cfg: Config) -> list[Any]:
    from uff_port.eval.suites import SuiteError, load_suite

    r = cfg.rl
    try:
        suite = load_suite(r.prompts)
    except SuiteError as exc:
        raise TrainError(ErrorCode.DATA_NOT_FOUND, f"rl.prompts: {exc}") from None
    tasks = [t for t in suite.tasks
             if (r.managers is None or t.manager in r.managers) and (r.stages is None or t.stage in r.stages)]
    if not tasks:
        raise TrainError(ErrorCode.NO_DATA, f"rl.prompts: no task of {suite.name} passes rl.managers "
                         f"{r.managers} / rl.stages {r.stages}")
    return tasks


# ---- a generation batch --------------------------------------------------------


@dataclass
class Rollout:
    """One generation batch, everything its updates need; JSON-able for the checkpoint."""

    tasks: list[int]  # task index per completion (G consecutive rows per prompt)
    prompts: list[list[int]]
    completions: list[list[int]]  # sampled tokens, EOS included when sampled
    rewards: list[float]
    scores: dict[str, list[float]]
    passed: list[bool | None]
    advantages: list[float]
    old_logps: list[list[float]] | None  # the sampling policy's, when rl.iterations > 1
    ref_logps: list[list[float]] | None  # the reference's, when rl.kl_beta > 0
    gen_tokens_per_s: float
    done: int = 0  # optimizer steps of this batch already taken
    kl: float = 0.0  # sums over the steps taken, for the rollout event
    clip_fraction: float = 0.0
    update_tokens_per_s: float = 0.0
    world: dict[str, Any] | None = None
    """Every rank's rewards, scores, passes and lengths, in rank order (N processes), for
    the events' global figures; None in one process (the rows above are all of them)."""

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Rollout:
        return cls(**state)


class RLCursor:
    """The RL recipe's `data`: what the checkpoint's data cursor must hold to resume exactly."""

    def __init__(self, prompts: PromptStream, sampler: torch.Generator, sft: PackedStream | None, pad_id: int,
                 rank: int = 0, world: int = 1) -> None:
        self.prompts = prompts
        self.sampler = sampler
        self.sft = sft
        self.pad_id = sft.pad_id if sft is not None else pad_id
        self.batch: Rollout | None = None
        self.rank, self.world = rank, world

    @property
    def epoch(self) -> int:
        return self.prompts.epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CURSOR_VERSION,
            "prompts": self.prompts.state_dict(),
            "sampler": base64.b64encode(self.sampler.get_state().numpy().tobytes()).decode("ascii"),
            "sft": self.sft.state_dict() if self.sft is not None else None,
            "batch": self.batch.to_state() if self.batch is not None else None,
        }

    def checkpoint_state(self) -> dict[str, Any]:
        """`state_dict` with every rank's sampler and pending batch (a collective on N processes)."""
        state = self.state_dict()
        if self.world == 1:
            return state
        mine = {"sampler": state.pop("sampler"), "batch": state.pop("batch")}
        ranks: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(ranks, mine)
        return {**state, "world_size": self.world, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != CURSOR_VERSION:
            raise TrainError(ErrorCode.DATA_CURSOR_MISMATCH, "the checkpoint's data cursor is not an RL cursor "
                             "(a checkpoint of an SFT run?)")
        ranks = state.get("ranks")
        saved_world = len(ranks) if ranks is not None else 1
        if saved_world != self.world:
            raise TrainError(ErrorCode.DATA_CURSOR_MISMATCH, f"this RL checkpoint was saved by {saved_world} "
                             f"process(es) and holds each one's sampler and pending generation batch; resume it "
                             f"with distributed.nproc x nnodes = {saved_world} (this run has {self.world})")
        own = ranks[self.rank] if ranks is not None else state
        self.prompts.load_state_dict(state["prompts"])
        raw = bytearray(base64.b64decode(own["sampler"]))
        self.sampler.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
        if self.sft is not None and state.get("sft") is not None:
            self.sft.load_state_dict(state["sft"])
        self.batch = Rollout.from_state(own["batch"]) if own.get("batch") else None

    def close(self) -> None:
        if self.sft is not None:
            self.sft.close()


def is_sft_step(step: int, ratio: float) -> bool:
    """Step `step` (1-based) is supervised: floor(step * ratio) ticks up (an even spread)."""
    return ratio > 0 and math.floor(step * ratio + 1e-9) > math.floor((step - 1) * ratio + 1e-9)


def _kill_torchrun_group() -> None:
    """The kill hook under torchrun: SIGKILL torchrun, every rank and the launcher at once,
    as a machine that loses power would (torchrun first, so it cannot react to the rest)."""
    import psutil

    torchrun = psutil.Process(os.getppid())
    launcher = torchrun.parent()
    victims = [torchrun, *(p for p in torchrun.children() if p.pid != os.getpid())]
    for proc in [*victims, *([launcher] if launcher is not None and launcher.pid > 1 else [])]:
        try:
            proc.kill()
        except psutil.Error:
            pass


# ---- the model's side ------------------------------------------------------------


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def sample(model: Any, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
           eos_id: int | None, pad_id: int, generator: torch.Generator, autocast: torch.dtype | None,
           poll: Any = None) -> list[list[int]]:
    """Sample a completion per prompt row with a KV cache; draws only from `generator`."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, device)
    n = ids.shape[0]
    out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    pos = _positions(mask)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        step_out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past = step_out.past_key_values
        last_pos = pos[:, -1:]
        for t in range(max_new_tokens):
            if poll is not None:
                poll()
            logits = step_out.logits[:, -1, :].float() / temperature
            probs = _filter_top_p(logits, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            if eos_id is not None:
                ended = (nxt == eos_id) & ~done
                lengths = torch.where(ended, torch.full_like(lengths, t + 1), lengths)
                done = done | ended
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            step_out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos,
                             past_key_values=past, use_cache=True)
            past = step_out.past_key_values
    rows = out.tolist()
    return [rows[i][: int(lengths[i])] for i in range(n)]


def completion_logps(model: Any, prompts: list[list[int]], completions: list[list[int]], *, pad_id: int,
                     temperature: float, autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each completion token under `model`, mask), both (rows, longest completion).

    Prompts left-padded, completions right-padded, so every completion starts at the same
    column; logits are divided by the sampling temperature, as the sampler did.
    """
    device = next(model.parameters()).device
    p_ids, p_mask = _left_pad(prompts, pad_id, device)
    width = max(1, max(len(c) for c in completions))
    c_ids = torch.full((len(completions), width), pad_id, dtype=torch.long, device=device)
    c_mask = torch.zeros((len(completions), width), dtype=torch.long, device=device)
    for i, c in enumerate(completions):
        if c:
            c_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
            c_mask[i, : len(c)] = 1
    ids = torch.cat([p_ids, c_ids], dim=1)
    mask = torch.cat([p_mask, c_mask], dim=1)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    p = p_ids.shape[1]
    logits = logits[:, p - 1 : -1].float() / temperature
    logps = logits.gather(-1, c_ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logps, c_mask.float()


def group_advantages(rewards: list[float], group: int) -> list[float]:
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + _ADV_EPS)
    return [float(a) for a in adv.flatten()]


def _pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def batch_reward(batch: Rollout) -> float:
    """The mean total reward of the generation batch, over every rank's completions."""
    return statistics.fmean(batch.world["rewards"] if batch.world else batch.rewards)


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


# ---- the recipe ------------------------------------------------------------------


class RLTrainer(Trainer):
    """GRPO over the SFT recipe's machinery; `data` is an `RLCursor`."""

    def setup(self) -> None:
        from uff_port.training.rewards import RewardError, Rewards

        self.tasks = load_prompts(self.cfg)
        try:
            self.rewards = Rewards(self.cfg.rl)
        except RewardError as exc:
            raise TrainError(ErrorCode.INVALID_CONFIG, str(exc)) from None
        super().setup()
        if self.engine.layout != "torch":
            raise TrainError(ErrorCode.INVALID_CONFIG, "stage rl runs on the torch engine only")
        self._kill_at = os.environ.get(KILL_AT_ENV, "")
        self._prompt_ids = [self._encode(t.prompt) for t in self.tasks]

    @property
    def cursor(self) -> RLCursor:
        """`data`, typed: the RL recipe's data is always an RLCursor."""
        assert isinstance(self.data, RLCursor)
        return self.data

    def _encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids[-self.cfg.rl.max_prompt_tokens:] or [self._pad()]

    def _pad(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def _stream(self, split: str) -> Any:
        if split != "train":
            return super()._stream(split)
        r = self.cfg.rl
        sft: PackedStream | None = None
        if r.sft_ratio > 0:
            if r.sft_path is None:
                sft = super()._stream("train")
            else:
                sft = PackedStream(r.sft_path, self.tokenizer, self.cfg.data, split="train", seed=self.cfg.training.seed,
                                   rank=self.rank, world_size=self.world)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.training.seed * 7919 + 104729 * self.rank + 17)
        return RLCursor(PromptStream(self.tasks, self.cfg.training.seed), gen, sft, self._pad(), self.rank, self.world)

    def _checkpoint_cursor(self) -> dict[str, Any]:
        return self.cursor.checkpoint_state()

    def _maybe_die(self, phase: str) -> None:
        if not self._kill_at or self._kill_at != f"{self.step + 1}:{phase}":
            return
        if self.world > 1 and self.rank == 0:
            _kill_torchrun_group()
        if self.world == 1 or self.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def _status(self) -> dict[str, Any]:
        return {**super()._status(), "stage": "rl"}

    # ---- the loop ------------------------------------------------------------------
    def train(self) -> int:
        t = self.cfg.training
        if self.step >= t.max_steps:
            return self._finish()
        self.set_state("training", resumed_from=self.resumed_step)
        pending: list[Command] = []
        data = self.cursor
        while self.step < t.max_steps:
            self._boundary(pending)
            t0 = time.monotonic()
            self._step_cursor = data.state_dict()
            try:
                if is_sft_step(self.step + 1, self.cfg.rl.sft_ratio):
                    assert data.sft is not None
                    seqs = data.sft.take(self.micro * self.accum)
                    if not seqs:
                        raise TrainError(ErrorCode.NO_DATA, "rl.sft_path: the SFT stream ended unexpectedly")
                    loss, n_tokens, grad_norm = self._step(seqs, pending)
                    reward, kind = None, "sft"
                else:
                    if data.batch is None:
                        data.batch = self._rollout(pending)
                    loss, n_tokens, grad_norm = self._rl_step(data.batch, pending)
                    reward, kind = batch_reward(data.batch), "rl"
            except _Abandon as stop:
                self.engine.zero_grad()
                data.load_state_dict(self._step_cursor)
                self._act(stop.want, pending)  # raises StopTraining
                continue
            except NonFiniteStep as bad:
                data.batch = None  # a batch that gave a non-finite step is dropped with it
                self._skip_or_fail(bad)
                continue
            self.step += 1
            self.tokens_seen += n_tokens
            self.loss = loss
            self.loss_window.add(loss)
            if self.guard is not None:
                self.guard.observe(loss)
            self._step_seconds = time.monotonic() - t0
            entry = {"step": self.step, "loss": loss, "tokens_per_s": n_tokens / max(self._step_seconds, 1e-9)}
            if reward is not None:
                entry["reward"] = reward
            self.history.append(entry)
            self.report.progress(
                t.progress_every_seconds, force=self.step == t.max_steps, step=self.step, max_steps=t.max_steps,
                loss=loss, lr=self.engine.lr(), tokens_per_s=entry["tokens_per_s"], grad_norm=grad_norm,
                tokens_seen=self.tokens_seen, epoch=data.epoch, micro_batch_size=self.micro, grad_accum=self.accum,
                step_seconds=self._step_seconds, stage=kind, reward=reward,
            )  # fmt: skip
            if data.batch is not None and data.batch.done >= self.cfg.rl.iterations:
                self._rollout_event(data.batch)
                data.batch = None
            if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0:
                self.evaluate()
            self._code_eval(pending, final=False)
        return self._finish()

    def _check_stop(self, pending: list[Command]) -> None:
        if self.world > 1:  # ranks poll only at step boundaries, where they agree (as in SFT)
            return
        want = self._poll(pending)
        if want in (STOP, STOP_NOSAVE):
            raise _Abandon(want)

    def _rollout(self, pending: list[Command]) -> Rollout:
        """Generate, score and prepare one batch (a stop abandons it; it is replayed exactly)."""
        r, data = self.cfg.rl, self.cursor
        share = r.prompts_per_step // self.world  # the cursor is global: every rank takes the whole batch
        mine = data.prompts.take(r.prompts_per_step)[self.rank * share : (self.rank + 1) * share]
        tasks = [i for i in mine for _ in range(r.num_generations)]
        prompts = [self._prompt_ids[i] for i in tasks]
        self.set_state("generating")
        self._maybe_die("generation")
        model = self.model
        model.eval()
        t0 = time.perf_counter()
        completions = sample(
            model, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            eos_id=self.tokenizer.eos_token_id, pad_id=self._pad(), generator=data.sampler,
            autocast=self.engine.autocast, poll=lambda: self._check_stop(pending),
        )  # fmt: skip
        gen_tps = sum(len(c) for c in completions) / max(time.perf_counter() - t0, 1e-9)
        self.set_state("scoring")
        self._maybe_die("rewards")
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        rewards, scores, passed = self.rewards.score([self.tasks[i] for i in tasks], texts,
                                                     on_done=lambda _i: self._check_stop(pending))
        old = ref = None
        with torch.no_grad():
            if r.iterations > 1:
                old = self._logps_rows(prompts, completions)
            if r.kl_beta > 0:
                with model.disable_adapter():
                    ref = self._logps_rows(prompts, completions)
        self.set_state("training")
        world = None
        if self.world > 1:
            parts: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(parts, {"rewards": rewards, "scores": scores, "passed": passed,
                                                        "lengths": [len(c) for c in completions],
                                                        "gen_tokens_per_s": gen_tps})
            world = {"rewards": [x for p in parts for x in p["rewards"]],
                     "scores": {k: [x for p in parts for x in p["scores"][k]] for k in scores},
                     "passed": [x for p in parts for x in p["passed"]],
                     "lengths": [x for p in parts for x in p["lengths"]],
                     "gen_tokens_per_s": sum(p["gen_tokens_per_s"] for p in parts)}  # the ranks run side by side
        return Rollout(tasks=tasks, prompts=prompts, completions=completions, rewards=rewards, scores=scores,
                       passed=passed, advantages=group_advantages(rewards, r.num_generations), old_logps=old,
                       ref_logps=ref, gen_tokens_per_s=gen_tps, world=world)

    def _logps_rows(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(prompts), self.micro):
            lp, _ = completion_logps(self.model, prompts[i : i + self.micro], completions[i : i + self.micro],
                                     pad_id=self._pad(), temperature=self.cfg.rl.temperature,
                                     autocast=self.engine.autocast)
            out.extend(lp[j, : len(c)].tolist() for j, c in enumerate(completions[i : i + self.micro]))
        return out

    def _rl_step(self, batch: Rollout, pending: list[Command]) -> tuple[float, int, float | None]:
        """One optimizer step of the clipped surrogate (+ KL) over the whole batch."""
        eng = self.engine
        self._maybe_die("update")
        eng.module.train()
        t0 = time.perf_counter()
        n_rows = len(batch.completions)
        local = sum(len(c) for c in batch.completions)
        # Every completion token of every rank counts once: the loss is their mean.
        total = max(1, int(dist.all_reduce_sum(torch.tensor(float(local), device=self.device))))
        loss_sum = torch.zeros((), dtype=torch.float64)
        kl_sum = clip_sum = 0.0
        starts = list(range(0, n_rows, self.micro))  # the same count on every rank: equal shares
        for k, i in enumerate(starts):
            if k:
                self._check_stop(pending)
            with dist.no_sync_unless(eng.module, last=k == len(starts) - 1):  # one all-reduce per step
                s, kl_part, clip_part = self._surrogate(batch, slice(i, i + self.micro))
                scaled = s * self.world / total  # DDP averages gradients over ranks: undo it
                (eng.scaler.scale(scaled) if eng.scaler else scaled).backward()
            loss_sum += s.detach().double().cpu()
            kl_sum += kl_part
            clip_sum += clip_part
        if self.world > 1:  # the global figures: every rank decides alike, rank 0 reports them
            sums = dist.all_reduce_sum(torch.tensor([float(loss_sum), kl_sum, clip_sum], dtype=torch.float64,
                                                    device=self.device)).cpu()
            loss_sum, kl_sum, clip_sum = sums[0], float(sums[1]), float(sums[2])
        grad_norm = self._apply(float(loss_sum) / total)
        batch.done += 1
        batch.kl += kl_sum / total
        batch.clip_fraction += clip_sum / total
        batch.update_tokens_per_s = total / max(time.perf_counter() - t0, 1e-9)
        return float(loss_sum) / total, total, grad_norm

    def _surrogate(self, batch: Rollout, rows: slice) -> tuple[torch.Tensor, float, float]:
        """(summed per-token loss of these rows, their KL sum, their clipped-token count)."""
        r, eng = self.cfg.rl, self.engine
        logp, mask = completion_logps(eng.module, batch.prompts[rows], batch.completions[rows], pad_id=self._pad(),
                                      temperature=r.temperature, autocast=eng.autocast)
        width = logp.shape[1]
        old = _pad_rows(batch.old_logps[rows], width).to(logp.device) if batch.old_logps else logp.detach()
        adv = torch.tensor(batch.advantages[rows], dtype=torch.float32, device=logp.device)[:, None]
        ratio = torch.exp(logp - old)
        clipped = torch.clamp(ratio, 1 - r.clip_epsilon, 1 + r.clip_epsilon)
        per_token = -torch.min(ratio * adv, clipped * adv)
        kl_sum = 0.0
        if batch.ref_logps is not None:
            ref = _pad_rows(batch.ref_logps[rows], width).to(logp.device)
            delta = ref - logp
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
            per_token = per_token + r.kl_beta * kl
            kl_sum = float((kl.detach() * mask).sum())
        is_clipped = ((ratio < 1 - r.clip_epsilon) & (adv < 0)) | ((ratio > 1 + r.clip_epsilon) & (adv > 0))
        return (per_token * mask).sum(), kl_sum, float((is_clipped.float() * mask).sum())

    def _apply(self, loss: float) -> float:
        """Clip, check, step: the torch engine's step tail (the gradient is already there)."""
        return self.engine.apply_gradients(loss)  # type: ignore[attr-defined]  # RL runs on TorchEngine only

    def _rollout_event(self, batch: Rollout) -> None:
        w = batch.world
        passed = w["passed"] if w else batch.passed
        tested = [p for p in passed if p is not None]
        lengths = w["lengths"] if w else [len(c) for c in batch.completions]
        self.emit(
            "rollout",
            step=self.step,
            reward=batch_reward(batch),
            rewards={name: _stats(v) for name, v in (w["scores"] if w else batch.scores).items()},
            pass_rate=(sum(tested) / len(tested)) if tested else None,
            completion_length=statistics.fmean(lengths),
            completions=len(lengths),
            kl=batch.kl / max(batch.done, 1) if batch.ref_logps is not None else None,
            clip_fraction=batch.clip_fraction / max(batch.done, 1),
            gen_tokens_per_s=w["gen_tokens_per_s"] if w else batch.gen_tokens_per_s,
            update_tokens_per_s=batch.update_tokens_per_s,
        )

    def cleanup(self) -> None:
        super().cleanup()
        if hasattr(self, "rewards"):
            self.rewards.close()


def rollout_rewards(run_dir: Path) -> dict[int, float]:
    """step -> mean reward of the batch, from a run's events (the last value seen wins)."""
    from uff_port.training.reporting import read_events

    return {int(e["step"]): float(e["reward"]) for e in read_events(run_dir) if e.get("event") == "rollout"}


__all__ = ["RLCursor", "RLTrainer", "Rollout", "group_advantages", "is_sft_step", "sample"]


"""Streaming JSONL corpus -> tokenized, masked, packed sequences, with an exact cursor.

The corpus is never loaded whole: files are read line by line and the stream's
position is a byte offset, so `load_state_dict` seeks straight back to where a
checkpoint left off (O(1) in the corpus size) and the continuation is the very
same sequence of tokens an uninterrupted run would have seen.

Packing keeps samples apart without a custom mask: every sample's position_ids
restart at 0 and no attention_mask is passed, which makes transformers build a
block-diagonal causal mask (one block per sample). Each sample's first label is
-100 so the loss never asks a sample to predict the next sample's first token.
Packs are padded to `seq_len` with a pad segment of its own (labels -100).

Multi-process order: all ranks read the same global stream of sequences and
rank r keeps global sequence i when i % world_size == r. A rank consumes
world_size sequences per call, so at every optimizer step the cursor is the
same on every rank, and changing 1 <-> 2 processes keeps the global position.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from uff_port.core.config import DataConfig
from uff_port.protocol.errors import ErrorCode
from uff_port.training.builtin import resolve_data_path

IGNORE: Final = -100
_SKIP_CHUNK: Final = 1 << 20  # bytes read at a time while skipping an oversized line
Split = Literal["train", "eval"]
BadLineHook = Callable[[str, int, str], None]  # (file, line_no, reason)


class DataError(Exception):
    """The corpus cannot feed training; `code` is stable, message says what to fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]


@dataclass
class Sequence_:
    """One training row: tokens, targets and per-sample positions (None = not packed)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None
    pad: int = 0
    """Trailing padding segment of a packed row: never computed (`collate` cuts it off)."""

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def in_eval_split(file_name: str, line_no: int, fraction: float) -> bool:
    """Deterministic held-out split by (file name, line number): stable across runs and seeds."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{file_name}:{line_no}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class Tokenize:
    """Turns one record into a masked Sample, per format."""

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # data.chat_template fills in for a tokenizer that has none (base models often ship none).
        self.template: str | None = None
        if not getattr(tokenizer, "chat_template", None) and cfg.chat_template:
            from uff_port.core.config import CHAT_TEMPLATES

            self.template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
        self.has_template = bool(self.template or getattr(tokenizer, "chat_template", None))

    def _enc(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def format_of(self, rec: dict[str, Any]) -> str:
        fmt = self.cfg.format
        if fmt == "auto":
            if "messages" in rec:
                return "messages"
            if "prompt" in rec or "completion" in rec:
                return "prompt_completion"
            if "text" in rec:
                return "text"
            raise ValueError("record has none of 'text', 'prompt'/'completion', 'messages'")
        return fmt

    def __call__(self, rec: dict[str, Any]) -> Sample:
        fmt = self.format_of(rec)
        if fmt == "text":
            text = rec.get("text")
            if not isinstance(text, str):
                raise ValueError("'text' must be a string")
            ids = self.bos + self._enc(text) + self.eos
            return Sample(ids, list(ids))
        if fmt == "prompt_completion":
            prompt, completion = rec.get("prompt"), rec.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ValueError("'prompt' and 'completion' must both be strings")
            p = self.bos + self._enc(prompt)
            c = self._enc(completion) + self.eos
            masked = [IGNORE] * len(p) if self.cfg.completion_only_loss else list(p)
            return Sample(p + c, masked + c)
        return self._messages(rec.get("messages"))

    def _messages(self, msgs: Any) -> Sample:
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("each message needs string 'role' and 'content'")
        if not self.has_template:
            raise ValueError("a 'messages' record, but the tokenizer has no chat template: set data.chat_template "
                             "(deepseek-coder, chatml or a Jinja string)")
        template = self.template

        def render(m: list[dict[str, Any]], **kw: Any) -> str:
            return str(self.tok.apply_chat_template(m, chat_template=template, **kw) if template
                       else self.tok.apply_chat_template(m, **kw))

        full: str = render(msgs, tokenize=False)
        # Character spans of the assistant replies: the rendering up to a reply
        # (with the generation prompt) is a prefix of the rendering through it.
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(render(msgs[:i], tokenize=False, add_generation_prompt=True))
            end = len(render(msgs[: i + 1], tokenize=False))
            spans.append((start, end))
        if not spans:
            raise ValueError("'messages' has no assistant turn to learn from")
        ids: list[int] = []
        labels: list[int] = []
        pos = 0
        for start, end in spans:
            head = self._enc(full[pos:start])
            body = self._enc(full[start:end])
            ids += head + body
            labels += ([IGNORE] * len(head) if self.cfg.completion_only_loss else head) + body
            pos = end
        tail = self._enc(full[pos:])
        ids += tail
        labels += [IGNORE] * len(tail) if self.cfg.completion_only_loss else tail
        return Sample(ids, labels)


def keeps(cfg: DataConfig, rec: dict[str, Any]) -> bool:
    """Whether data.managers and data.stages keep this record."""
    if cfg.managers is not None and str(rec.get("manager", "")).lower() not in cfg.managers:
        return False
    return cfg.stages is None or rec.get("stage") in cfg.stages


class PackedStream:
    """The resumable stream of training (or eval) sequences for one rank."""

    def __init__(
        self,
        paths: str | Sequence[str],
        tokenizer: Any,
        cfg: DataConfig,
        *,
        split: Split = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_bad_line: BadLineHook | None = None,
    ) -> None:
        raw = [paths] if isinstance(paths, str) else list(paths)
        self.files: list[Path] = [resolve_data_path(p) for p in raw]
        for f in self.files:
            if f.is_dir():
                raise DataError(ErrorCode.DATA_NOT_FOUND, f"data.path: {str(f)!r} is a directory, expected a JSONL file")
            if not f.is_file():
                raise DataError(ErrorCode.DATA_NOT_FOUND, f"data.path: no such file {str(f)!r}")
        self.cfg = cfg
        self.split = split
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.tokenize = Tokenize(tokenizer, cfg)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.tokenize.eos or [0])[0]
        self.on_bad_line = on_bad_line
        self.loop = split == "train"  # training cycles through epochs; eval is one pass
        self._fh: Any = None
        self._fh_index = -1
        self._rng = random.Random(seed)
        self.file_index = 0
        self.byte_offset = 0
        self.line_no = 0
        self.epoch = 0
        self.seq_index = 0  # global sequences produced so far
        self.bad_lines = 0
        self.samples_in_epoch = 0
        self.pack: list[Sample] = []
        self.shuffle_buf: list[Sample] = []
        self.exhausted = False

    # ---- cursor -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able, exact position; equal on all ranks at optimizer-step boundaries."""
        return {
            "version": 1,
            "files": [f.name for f in self.files],
            "file_index": self.file_index,
            "byte_offset": self.byte_offset,
            "line_no": self.line_no,
            "epoch": self.epoch,
            "seq_index": self.seq_index,
            "bad_lines": self.bad_lines,
            "samples_in_epoch": self.samples_in_epoch,
            "pack_buffer": [[s.ids, s.labels] for s in self.pack],
            "shuffle_buffer": [[s.ids, s.labels] for s in self.shuffle_buf],
            "shuffle_state": _rng_to_json(self._rng.getstate()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek straight to the saved byte offset; nothing before it is read again."""
        if state.get("files") != [f.name for f in self.files]:
            raise DataError(
                ErrorCode.DATA_CURSOR_MISMATCH,
                f"data.path: the checkpoint's cursor is for files {state.get('files')}, not {[f.name for f in self.files]}",
            )
        self.file_index = int(state["file_index"])
        self.byte_offset = int(state["byte_offset"])
        self.line_no = int(state["line_no"])
        self.epoch = int(state["epoch"])
        self.seq_index = int(state["seq_index"])
        self.bad_lines = int(state["bad_lines"])
        self.samples_in_epoch = int(state.get("samples_in_epoch", 0))
        self.pack = [Sample(list(a), list(b)) for a, b in state["pack_buffer"]]
        self.shuffle_buf = [Sample(list(a), list(b)) for a, b in state["shuffle_buffer"]]
        self._rng.setstate(_rng_from_json(state["shuffle_state"]))
        self._close()
        self.exhausted = False

    # ---- reading ------------------------------------------------------------
    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh, self._fh_index = None, -1

    def close(self) -> None:
        self._close()

    def _next_line(self) -> tuple[bytes | None, int, int] | None:
        """Next raw line, its number and size, advancing the cursor; None at the end of an epoch.

        A line over `data.max_line_bytes` comes back as None (with its size): it is
        skipped in bounded chunks, so one giant line never sits in memory.
        """
        limit = self.cfg.max_line_bytes
        while self.file_index < len(self.files):
            if self._fh_index != self.file_index:
                self._close()
                self._fh = open(self.files[self.file_index], "rb")  # noqa: SIM115 - kept open across calls
                self._fh_index = self.file_index
                self._fh.seek(self.byte_offset)
            line = self._fh.readline(limit + 1)
            if line:
                size = len(line)
                oversized = size > limit and not line.endswith(b"\n")
                while oversized and not line.endswith(b"\n"):
                    line = self._fh.readline(_SKIP_CHUNK)
                    if not line:
                        break
                    size += len(line)
                self.byte_offset += size
                self.line_no += 1
                return (None if oversized else line), self.line_no, size
            self._close()
            self.file_index += 1
            self.byte_offset = 0
            self.line_no = 0
        return None

    def _bad(self, line_no: int, reason: str) -> None:
        self.bad_lines += 1
        name = self.files[self.file_index].name if self.file_index < len(self.files) else "?"
        if self.on_bad_line is not None:
            self.on_bad_line(name, line_no, reason)
        if self.bad_lines > self.cfg.max_bad_lines:
            raise DataError(
                ErrorCode.TOO_MANY_BAD_LINES,
                f"data.max_bad_lines: {self.bad_lines} bad lines (last: {name} line {line_no}: {reason}); "
                f"fix the corpus or raise data.max_bad_lines (now {self.cfg.max_bad_lines})",
            )

    def _keep(self, rec: dict[str, Any]) -> bool:
        return keeps(self.cfg, rec)

    def _next_sample(self) -> Sample | None:
        """Next usable sample of this split; crosses epochs when looping, None at the end."""
        while True:
            item = self._next_line()
            if item is None:
                if not self.loop:
                    return None
                if self.samples_in_epoch == 0:
                    raise DataError(
                        ErrorCode.NO_DATA,
                        f"data.path: no usable {self.split} records in {[str(f) for f in self.files]} "
                        "(check data.managers, data.stages, data.eval_fraction and the record format)",
                    )
                self.epoch += 1
                self.file_index, self.byte_offset, self.line_no, self.samples_in_epoch = 0, 0, 0, 0
                continue
            raw, line_no, size = item
            name = self.files[self.file_index].name
            if (self.split == "eval") != in_eval_split(name, line_no, self.cfg.eval_fraction):
                continue
            if raw is None:
                self._bad(line_no, f"line of {size} bytes is longer than data.max_line_bytes ({self.cfg.max_line_bytes})")
                continue
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                self._bad(line_no, f"not valid JSON: {exc}")
                continue
            if not isinstance(rec, dict):
                self._bad(line_no, f"expected a JSON object, got {type(rec).__name__}")
                continue
            if not self._keep(rec):
                continue
            try:
                sample = self.tokenize(rec)
            except (ValueError, TypeError, KeyError) as exc:
                self._bad(line_no, str(exc))
                continue
            n = self.cfg.seq_len
            sample = Sample(sample.ids[:n], sample.labels[:n])
            sample.labels[0] = IGNORE  # never predict across a sample boundary
            if all(x == IGNORE for x in sample.labels):
                continue  # truncation left nothing to learn
            self.samples_in_epoch += 1
            return sample

    def _shuffled_sample(self) -> Sample | None:
        size = self.cfg.shuffle_buffer if self.split == "train" else 0
        if size <= 0:
            return self._next_sample()
        while len(self.shuffle_buf) < size:
            s = self._next_sample()
            if s is None:
                break
            self.shuffle_buf.append(s)
        if not self.shuffle_buf:
            return None
        i = self._rng.randrange(len(self.shuffle_buf))
        self.shuffle_buf[i], self.shuffle_buf[-1] = self.shuffle_buf[-1], self.shuffle_buf[i]
        return self.shuffle_buf.pop()

    def _next_global(self) -> Sequence_ | None:
        if not self.cfg.packing:
            s = self._shuffled_sample()
            if s is None:
                return None
            self.seq_index += 1
            return Sequence_(s.ids, s.labels, None)
        while True:
            s = self._shuffled_sample()
            used = sum(len(p.ids) for p in self.pack)
            if s is None:
                if not self.pack:
                    return None
                out, self.pack = self.pack, []
                break
            if self.pack and used + len(s.ids) > self.cfg.seq_len:
                out, self.pack = self.pack, [s]
                break
            self.pack.append(s)
        self.seq_index += 1
        return self._assemble(out)

    def _assemble(self, samples: list[Sample]) -> Sequence_:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for s in samples:
            ids += s.ids
            labels += s.labels
            pos += list(range(len(s.ids)))
        pad = self.cfg.seq_len - len(ids)
        if pad > 0:  # a segment of its own: real tokens never attend to it
            ids += [self.pad_id] * pad
            labels += [IGNORE] * pad
            pos += list(range(pad))
        return Sequence_(ids, labels, pos, max(pad, 0))

    def next_sequence(self) -> Sequence_ | None:
        """This rank's next sequence: reads world_size global ones, keeps number `rank`."""
        if self.exhausted:
            return None
        mine: Sequence_ | None = None
        for r in range(self.world_size):
            seq = self._next_global()
            if seq is None:
                self.exhausted = True
                return mine
            if r == self.rank:
                mine = seq
        return mine

    def take(self, n: int) -> list[Sequence_]:
        out = []
        for _ in range(n):
            seq = self.next_sequence()
            if seq is None:
                break
            out.append(seq)
        return out


SCAN_LINES: Final = 5_000
"""Lines the trainer scans before loading the model (all of them when training.num_epochs is set)."""


@dataclass
class CorpusScan:
    """What one pass over a corpus found (`uff-port data inspect`, and the trainer before the model loads)."""

    files: list[str]
    lines: int = 0
    """Non-empty lines read."""
    records: int = 0
    """Usable records (tokenized, kept by data.managers/stages) in both splits."""
    train_records: int = 0
    eval_records: int = 0
    filtered_out: int = 0
    """Valid records left out by data.managers / data.stages."""
    train_tokens: int = 0
    """Tokens of the training split after truncation to data.seq_len."""
    train_sequences: int = 0
    """Training rows per epoch: packed to data.seq_len, or one per record without packing."""
    truncated: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)
    bad_reasons: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    managers: Counter[str] = field(default_factory=Counter)
    stages: Counter[str] = field(default_factory=Counter)
    complete: bool = True
    """False when the scan stopped at its line limit."""

    @property
    def bad_fraction(self) -> float:
        return self.bad_lines / self.lines if self.lines else 0.0

    def steps_per_epoch(self, micro_batch_size: int, grad_accum_steps: int) -> int:
        """Optimizer steps for one pass: a step takes micro_batch_size * grad_accum_steps rows
        in all (the global batch, however many processes share it)."""
        return max(1, math.ceil(self.train_sequences / (micro_batch_size * grad_accum_steps)))

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, Counter)}
        for k, v in self.__dict__.items():
            if isinstance(v, Counter):
                out[k] = dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0])))
        out["bad_fraction"] = self.bad_fraction
        return out

    def refusal(self, cfg: DataConfig) -> DataError | None:
        """A DataError when the bad-line share is over data.max_bad_line_fraction, else None."""
        if not self.bad_lines or self.bad_fraction <= cfg.max_bad_line_fraction:
            return None
        reasons = "; ".join(f"{n} x {r}" for r, n in self.bad_reasons.most_common(3))
        return DataError(
            ErrorCode.TOO_MANY_BAD_LINES,
            f"data.max_bad_line_fraction: {self.bad_lines} of {self.lines} lines "
            f"{'' if self.complete else 'scanned '}are bad ({self.bad_fraction:.1%}, over "
            f"{cfg.max_bad_line_fraction:.1%}): {reasons}. First: {self.bad_examples[0]}. Nothing was trained: "
            "fix the corpus (`uff-port data inspect`), or raise data.max_bad_line_fraction",
        )


def _reason_kind(reason: str) -> str:
    """The reason without its line-specific details (for counting reasons)."""
    return reason.split(":", 1)[0] if reason.startswith("not valid JSON") else reason


def scan_corpus(paths: str | Sequence[str], tokenizer: Any, cfg: DataConfig, *, max_lines: int | None = None) -> CorpusScan:
    """One bounded pass over the corpus with the very rules of the stream (split, filters,
    formats, truncation, packing), without shuffling: counts, not batches."""
    raw = [paths] if isinstance(paths, str) else list(paths)
    files = [resolve_data_path(p) for p in raw]
    for f in files:
        if f.is_dir():
            raise DataError(ErrorCode.DATA_NOT_FOUND, f"data.path: {str(f)!r} is a directory, expected a JSONL file")
        if not f.is_file():
            raise DataError(ErrorCode.DATA_NOT_FOUND, f"data.path: no such file {str(f)!r}")
    scan = CorpusScan(files=[str(f) for f in files])
    tok = Tokenize(tokenizer, cfg)
    used = 0  # tokens in the pack being filled
    limit = cfg.max_line_bytes

    def bad(name: str, line_no: int, reason: str) -> None:
        scan.bad_lines += 1
        scan.bad_reasons[_reason_kind(reason)] += 1
        if len(scan.bad_examples) < 5:
            scan.bad_examples.append(f"{name} line {line_no}: {reason}")

    for f in files:
        with open(f, "rb") as fh:
            line_no = 0
            while True:
                if max_lines is not None and scan.lines >= max_lines:
                    scan.complete = False
                    break
                line = fh.readline(limit + 1)
                if not line:
                    break
                line_no += 1
                if len(line) > limit and not line.endswith(b"\n"):
                    size = len(line)
                    while line and not line.endswith(b"\n"):
                        line = fh.readline(_SKIP_CHUNK)
                        size += len(line)
                    scan.lines += 1
                    bad(f.name, line_no, f"line of {size} bytes is longer than data.max_line_bytes ({limit})")
                    continue
                if not line.strip():
                    continue
                scan.lines += 1
                try:
                    rec = json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    bad(f.name, line_no, f"not valid JSON: {exc}")
                    continue
                if not isinstance(rec, dict):
                    bad(f.name, line_no, f"expected a JSON object, got {type(rec).__name__}")
                    continue
                scan.managers[str(rec.get("manager", "-")).lower()] += 1
                scan.stages[str(rec.get("stage", "-"))] += 1
                try:
                    fmt = tok.format_of(rec)
                    sample = tok(rec)
                except (ValueError, TypeError, KeyError) as exc:
                    bad(f.name, line_no, str(exc))
                    continue
                scan.formats[fmt] += 1
                if not keeps(cfg, rec):
                    scan.filtered_out += 1
                    continue
                scan.records += 1
                if in_eval_split(f.name, line_no, cfg.eval_fraction):
                    scan.eval_records += 1
                    continue
                n = min(len(sample.ids), cfg.seq_len)
                scan.truncated += len(sample.ids) > cfg.seq_len
                if all(x == IGNORE for x in sample.labels[1:n]):
                    continue
                scan.train_records += 1
                scan.train_tokens += n
                if not cfg.packing:
                    scan.train_sequences += 1
                elif used == 0 or used + n > cfg.seq_len:
                    scan.train_sequences += 1
                    used = n
                else:
                    used += n
        if not scan.complete:
            break
    return scan



def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def collate(seqs: list[Sequence_], pad_id: int, *, flatten: bool = False) -> dict[str, Any]:
    """Tensors for one micro-batch. Packed rows carry position_ids and no mask (see module doc).

    Packed rows lose the padding segment every row of the batch has (real tokens never
    attend to it and its labels are -100, so nothing changes but the work). `flatten`
    (flash attention) joins the rows without their padding into one row: flash
    attention's varlen path reads sample boundaries from position_ids only at batch size 1
    (transformers' `_is_packed_sequence`); with more rows it would attend across samples.
    """
    import torch

    if all(s.position_ids is not None for s in seqs) and len({len(s.input_ids) for s in seqs}) == 1:
        if flatten:
            cut = [len(s.input_ids) - s.pad for s in seqs]
            return {
                "input_ids": torch.tensor([[x for s, n in zip(seqs, cut, strict=True) for x in s.input_ids[:n]]]),
                "labels": torch.tensor([[x for s, n in zip(seqs, cut, strict=True) for x in s.labels[:n]]]),
                "position_ids": torch.tensor(
                    [[x for s, n in zip(seqs, cut, strict=True) for x in (s.position_ids or [])[:n]]]
                ),
            }
        width = max(len(s.input_ids) - s.pad for s in seqs)
        return {
            "input_ids": torch.tensor([s.input_ids[:width] for s in seqs]),
            "labels": torch.tensor([s.labels[:width] for s in seqs]),
            "position_ids": torch.tensor([(s.position_ids or [])[:width] for s in seqs]),
        }
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}

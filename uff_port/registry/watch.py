"""Watch the serving side's metrics and roll a role back when an SLO stays breached.

Metrics come from a Prometheus text endpoint (the format vLLM and most
proxies expose) or a JSON file. An SLO is breached when its value passes
`max`/`min`; only a breach that lasts `window_s` (every poll in between
breached) rolls the role back, in the serving directory and in the registry,
with an audit row and a `slo_rollback` event naming the SLO, the value, the
excess and the start of the breach.

Flapping is damped twice: the rolled-back artifact is put on hold (no deploy
brings it back without `--unhold`), and the watcher never rolls *onto* a held
artifact, so a second breach cannot bounce the host back to the release that
failed first.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from uff_port.core.config_io import ConfigLimitError, load_yaml_file
from uff_port.registry.deploy import ReloadHooks, ServingDir, Switch, rollback_role
from uff_port.registry.errors import INVALID_SLO, RegistryError
from uff_port.registry.manifest import ROLES
from uff_port.registry.store import Registry

Emit = Callable[..., None]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(metric name, sorted label pairs) -> value."""
_FETCH_TIMEOUT_S: Final = 10.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    url: str | None = None
    """Prometheus text exposition, e.g. http://127.0.0.1:8000/metrics."""
    file: str | None = None
    """A JSON object; an SLO's `metric` is a dotted path into it (`ufm.latency_p95_ms`)."""

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.url is None) == (self.file is None):
            raise ValueError("give exactly one of url (Prometheus text) or file (JSON)")
        return self


class Slo(_Strict):
    name: str = Field(min_length=1)
    role: str
    metric: str = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    """Prometheus only: samples must carry these labels; matching samples are summed."""
    quantile: float | None = Field(default=None, gt=0, lt=1)
    """`metric` is a histogram: the value is this quantile estimated from `<metric>_bucket`."""
    divide_by: str | None = None
    """Value = metric / divide_by (an error rate: errors_total / requests_total)."""
    delta: bool = False
    """Counters: use the increase since the previous poll (the first poll gives no value)."""
    max: float | None = None
    min: float | None = None
    window_s: float = Field(default=60.0, ge=0)
    """The breach must hold this long before the role is rolled back."""

    @model_validator(mode="after")
    def _check(self) -> Slo:
        if self.role not in ROLES:
            raise ValueError(f"role: unknown {self.role!r}; expected one of {', '.join(ROLES)}")
        if self.max is None and self.min is None:
            raise ValueError("give max or min (or both)")
        return self


class SloConfig(_Strict):
    source: Source
    interval_s: float = Field(default=15.0, gt=0)
    cooldown_s: float | None = Field(default=None, ge=0)
    """After a rollback, that role is not judged for this long (default: its longest window)."""
    slos: list[Slo] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> SloConfig:
        names = [s.name for s in self.slos]
        if len(set(names)) != len(names):
            raise ValueError("slos: names must be unique")
        if self.source.file and any(s.quantile or s.labels for s in self.slos):
            raise ValueError("quantile and labels need a Prometheus source (url)")
        return self


def load_slo(path: str | Path) -> SloConfig:
    try:
        raw = load_yaml_file(path, "slo")
    except ConfigLimitError as exc:
        raise RegistryError(INVALID_SLO, exc.problem) from None
    try:
        return SloConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: "
                    f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()]
        raise RegistryError(INVALID_SLO, "invalid SLO file: " + "; ".join(problems),
                            {"problems": problems}) from None


# -- reading metrics ------------------------------------------------------------

_LINE: Final = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL: Final = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_prometheus(text: str) -> Samples:
    """The samples of a Prometheus text exposition (comments and malformed lines skipped)."""
    out: Samples = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(
            (k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for k, v in _LABEL.findall(m.group(2) or "")
        ))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


def read_source(source: Source) -> tuple[Samples | None, Any]:
    """(Prometheus samples, None) or (None, the JSON object)."""
    if source.url is not None:
        with urllib.request.urlopen(source.url, timeout=_FETCH_TIMEOUT_S) as resp:
            return parse_prometheus(resp.read().decode("utf-8", "replace")), None
    assert source.file is not None
    return None, json.loads(Path(source.file).read_text(encoding="utf-8"))


def _match(samples: Samples, name: str, labels: dict[str, str]) -> dict[tuple[tuple[str, str], ...], float]:
    want = set(labels.items())
    return {lab: v for (n, lab), v in samples.items() if n == name and want <= set(lab)}


def _sum(series: dict[Any, float]) -> float | None:
    return sum(series.values()) if series else None


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' estimate: linear interpolation inside the bucket holding rank q*count."""
    if not buckets or math.inf not in buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == math.inf:
                return lower  # past the last finite bucket: its bound is the best estimate
            width = count - below
            return lower + (upper - lower) * ((rank - below) / width if width > 0 else 1.0)
        lower, below = upper, count
    return None


def _json_path(data: Any, path: str) -> float | None:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


# -- the watcher --------------------------------------------------------------------


@dataclass
class _State:
    since: float | None = None
    last: float | None = None


@dataclass
class Watcher:
    """One SLO file against one serving directory; `poll()` is one round, `run()` loops (bounded)."""

    cfg: SloConfig
    target: Path
    registry: Path | None
    emit: Emit
    hooks: ReloadHooks | None = None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    states: dict[str, _State] = field(default_factory=dict)
    previous: Samples | None = None
    previous_json: Any = None
    quiet_until: dict[str, float] = field(default_factory=dict)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)

    def value(self, slo: Slo, samples: Samples | None, data: Any) -> float | None:
        if samples is None:
            num = _json_path(data, slo.metric)
            prev_num = _json_path(self.previous_json, slo.metric) if slo.delta else None
            den = _json_path(data, slo.divide_by) if slo.divide_by else None
            prev_den = _json_path(self.previous_json, slo.divide_by) if slo.delta and slo.divide_by else None
        else:
            if slo.quantile is not None:
                return self._quantile(slo, samples)
            num = _sum(_match(samples, slo.metric, slo.labels))
            den = _sum(_match(samples, slo.divide_by, slo.labels)) if slo.divide_by else None
            prev = self.previous or {}
            prev_num = _sum(_match(prev, slo.metric, slo.labels)) if slo.delta else None
            prev_den = _sum(_match(prev, slo.divide_by, slo.labels)) if slo.delta and slo.divide_by else None
        if slo.delta:
            if num is None or prev_num is None:
                return None
            num -= prev_num
            if slo.divide_by:
                if den is None or prev_den is None:
                    return None
                den -= prev_den
            if num < 0 or (den is not None and den < 0):
                return None  # a counter went down: the server restarted; judge from the next poll
        if slo.divide_by:
            return None if num is None or not den else num / den
        return num

    def _quantile(self, slo: Slo, samples: Samples) -> float | None:
        def buckets(s: Samples) -> dict[float, float]:
            out: dict[float, float] = {}
            for lab, v in _match(s, f"{slo.metric}_bucket", slo.labels).items():
                le = dict(lab).get("le")
                if le is not None:
                    bound = math.inf if le in ("+Inf", "Inf") else float(le)
                    out[bound] = out.get(bound, 0.0) + v
            return out

        now = buckets(samples)
        if slo.delta:
            if self.previous is None:
                return None
            before = buckets(self.previous)
            now = {b: c - before.get(b, 0.0) for b, c in now.items()}
            if any(c < 0 for c in now.values()):
                return None  # counters reset (server restart)
        assert slo.quantile is not None
        return histogram_quantile(slo.quantile, now)

    def poll(self) -> list[dict[str, Any]]:
        """Read the metrics once, update every SLO's breach window, roll back where one is due."""
        now = self.clock()
        try:
            samples, data = read_source(self.cfg.source)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.emit("metrics_unreadable", source=self.cfg.source.url or self.cfg.source.file, error=str(exc))
            return []
        due: dict[str, tuple[Slo, float, _State]] = {}
        for slo in self.cfg.slos:
            state = self.states.setdefault(slo.name, _State())
            if now < self.quiet_until.get(slo.role, -math.inf):
                continue
            value = self.value(slo, samples, data)
            state.last = value
            if value is None:
                continue  # no data is neither a breach nor a recovery
            breached = (slo.max is not None and value > slo.max) or (slo.min is not None and value < slo.min)
            if breached and state.since is None:
                state.since = now
                self.emit("slo_breached", **_describe(slo, value, now, now))
            elif not breached and state.since is not None:
                self.emit("slo_recovered", slo=slo.name, role=slo.role, value=value,
                          breached_for_s=now - state.since)
                state.since = None
            if breached and state.since is not None and now - state.since >= slo.window_s:
                due.setdefault(slo.role, (slo, value, state))
        self.previous, self.previous_json = samples, data
        done = []
        for role, (slo, value, state) in sorted(due.items()):
            assert state.since is not None
            out = self._roll_back(role, slo, value, state.since, now)
            if out is not None:
                done.append(out)
        return done

    def _roll_back(self, role: str, slo: Slo, value: float, since: float, now: float) -> dict[str, Any] | None:
        serving = ServingDir(self.target)
        current, previous = serving.link(role, "current"), serving.link(role, "previous")
        holds = serving.holds()
        reason = None
        if current is None:
            reason = "nothing deployed"
        elif current in holds:
            reason = f"{current[:12]} is already held"
        elif previous is None:
            reason = "no previous version to roll back to"
        elif previous in holds:
            reason = f"previous {previous[:12]} was itself rolled back (held): not bouncing back to it"
        note = _describe(slo, value, since, now)
        if reason is not None:
            self.emit("slo_rollback_skipped", **note, reason=reason)
            self._quiet(role, now)
            return None
        # an absent registry is not created here: the host alone is rolled back
        reg = Registry(self.registry) if self.registry and (self.registry / "registry.db").is_file() else None
        try:
            out = rollback_role(reg, self.target, role, actor="watch", note=note, hold=True,
                                expect_current=current)
        except RegistryError as exc:  # e.g. the previous version no longer verifies: report, keep watching
            self.emit("slo_rollback_failed", **note, code=exc.code, message=exc.message)
            self._quiet(role, now)
            return None
        finally:
            if reg is not None:
                reg.close()
        event = {**note, "rolled_back": out["rolled_back"], "restored": out["restored"],
                 "version": out["version"], "registry": out["registry"]}
        self.emit("slo_rollback", **event)
        self.rollbacks.append(event)
        self._quiet(role, now)
        if self.hooks is not None:  # after the event: the rollback stands even if the host cannot reload
            switch = Switch(role, out["restored"], out["version"], out["rolled_back"], True, out["path"])
            try:
                for done in self.hooks.run([switch], self.target):
                    self.emit("adapter_reloaded", **done)
            except RegistryError as exc:
                self.emit("reload_failed", role=role, code=exc.code, message=exc.message)
        return event

    def _quiet(self, role: str, now: float) -> None:
        windows = [s.window_s for s in self.cfg.slos if s.role == role]
        cooldown = self.cfg.cooldown_s if self.cfg.cooldown_s is not None else max(windows, default=0.0)
        self.quiet_until[role] = now + cooldown
        for s in self.cfg.slos:
            if s.role == role:
                self.states[s.name] = _State()

    def run(self, max_polls: int | None = None) -> list[dict[str, Any]]:
        polls = 0
        while max_polls is None or polls < max_polls:
            self.poll()
            polls += 1
            if max_polls is None or polls < max_polls:
                self.sleep(self.cfg.interval_s)
        return self.rollbacks


def _describe(slo: Slo, value: float, since: float, now: float) -> dict[str, Any]:
    """Which SLO, by how much, since when: the fields of the event and of the audit note."""
    bound: float | None
    if slo.max is not None and value > slo.max:
        bound, excess = slo.max, value - slo.max
    else:
        bound = slo.min if slo.min is not None else slo.max
        excess = (bound - value) if bound is not None else 0.0
    return {
        "slo": slo.name, "role": slo.role, "metric": slo.metric, "value": value,
        "threshold": {"max": slo.max, "min": slo.min}, "excess": excess,
        "excess_ratio": excess / abs(bound) if bound else None,
        "since": since, "since_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
        "breached_for_s": now - since, "window_s": slo.window_s,
    }

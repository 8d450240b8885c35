"""`uff-port plan-week` and `uff-port cloud status|pull|stop RUN_DIR`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from uff_port.cloud.commands import default_jobs
from uff_port.core import layout


def register(sub: Any) -> None:
    p = sub.add_parser("plan-week", help="show how jobs would spread over the week's cloud budget")
    p.add_argument("--job", action="append", default=[], metavar="NAME=HOURS", help="repeatable; default: main + six managers")
    p.add_argument("--config", default=None, help="a training config whose cloud: map sets the budgets")
    p.add_argument("--strategy", default="hybrid", choices=["hybrid", "kaggle", "sagemaker"])
    p.add_argument("--runs-root", default="runs", help="where the quota ledger lives")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan_week)

    n = sub.add_parser("notebook", help="write a notebook that runs a config by hand (Colab: no job API)")
    n.add_argument("config", help="YAML file or preset name in configs/")
    n.add_argument("--platform", required=True, choices=["colab"])
    n.add_argument("-o", "--output", default=None, help="default: <config name>.ipynb")
    n.add_argument("--drive-folder", default="uff-port", help="folder under MyDrive for the wheel, data and runs")
    n.set_defaults(func=cmd_notebook)

    c = sub.add_parser("cloud", help="inspect or act on a run's cloud job")
    c.add_argument("action", choices=["status", "pull", "stop"])
    c.add_argument("run_dir")
    c.add_argument("--config", default=None, help="default: RUN_DIR/config.yaml")
    c.set_defaults(func=cmd_cloud)


def cmd_notebook(args: argparse.Namespace) -> int:
    from uff_port.cloud.notebook import write_notebook
    from uff_port.core.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"notebook: {exc}", file=sys.stderr)
        return 2
    name = Path(args.config).stem or "run"
    out = Path(args.output or f"{name}.ipynb")
    info = write_notebook(cfg.to_dict(), out, name=name, folder=args.drive_folder)
    print(f"wrote {out}: open it in Colab (a GPU runtime) and run all cells; copy {info['wheel']}"
          + (f" and {', '.join(Path(p).name for p in info['data'])} (into data/)" if info["data"] else "")
          + f" to {info['drive_folder']} first. Colab has no job API: uff-port does not schedule or watch it.",
          file=sys.stderr)
    return 0


def _cloud_map(config: str | None) -> dict[str, Any]:
    if not config:
        return {}
    from uff_port.core.config import load_config_file

    return dict(load_config_file(config).get("cloud") or {})


def cmd_plan_week(args: argparse.Namespace) -> int:
    from uff_port.cloud.commands import plan_week
    from uff_port.protocol import CommandError

    jobs: list[tuple[str, float]] = []
    for item in args.job:
        name, sep, hours = item.partition("=")
        try:
            jobs.append((name, float(hours)))
        except ValueError:
            sep = ""
        if not sep:
            print(f"--job {item!r}: expected NAME=HOURS", file=sys.stderr)
            return 2
    ctx = argparse.Namespace(runs_root=Path(args.runs_root))
    try:
        result = plan_week({"jobs": jobs or default_jobs(), "cloud": _cloud_map(args.config), "strategy": args.strategy}, ctx)
    except CommandError as exc:
        print(f"plan-week: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else result["text"])
    return 0


def cmd_cloud(args: argparse.Namespace) -> int:
    from uff_port.cloud.backends.base import ProviderError, ProviderUnavailable
    from uff_port.cloud.factory import make_backend
    from uff_port.cloud.journal import Journal
    from uff_port.core.config import ConfigError, load_config

    run_dir = Path(args.run_dir)
    journal = Journal.load(run_dir)
    if journal is None or journal.current is None:
        print(f"{run_dir}: no cloud job", file=sys.stderr)
        return 1
    if args.action == "status":
        out: dict[str, Any] = journal.summary()
    try:
        cfg = load_config(args.config or run_dir / layout.CONFIG)
        from uff_port.cloud.settings import validate_cloud

        settings = validate_cloud(cfg.cloud)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    cur = journal.current
    try:
        backend = make_backend(cur.backend, settings, journal.data.run_id, run_dir / layout.CLOUD / "work")
        if args.action == "status":
            if cur.remote_ref:
                st = backend.status(cur.remote_ref)
                out["remote"] = {"state": st.state, "detail": st.detail}
            print(json.dumps(out, indent=2))
            return 0
        if args.action == "stop":
            if not cur.remote_ref:
                print("nothing submitted yet", file=sys.stderr)
                return 1
            backend.stop(cur.remote_ref)
            print(f"stop requested for {cur.name}")
            return 0
        return _pull(run_dir, cfg, settings)
    except ProviderUnavailable as exc:
        print(f"provider unreachable, try again later: {exc}", file=sys.stderr)
        return 75
    except ProviderError as exc:
        print(str(exc), file=sys.stderr)
        return 1


def _pull(run_dir: Path, cfg: Any, settings: Any) -> int:
    """Drive the journal until the current session is home and verified (no new session)."""
    from uff_port.cloud.factory import make_backend
    from uff_port.cloud.journal import REMOTE_DONE, Journal
    from uff_port.cloud.ledger import QuotaLedger
    from uff_port.cloud.runner import CloudRun

    journal = Journal.load(run_dir)
    cur = journal.current if journal else None
    if cur is None or cur.state not in (*REMOTE_DONE, "pulled", "refused"):
        print(f"nothing to pull: session is {cur.state if cur else 'absent'} (see `uff-port cloud status`)", file=sys.stderr)
        return 75 if cur is not None and cur.state != "verified" else 0

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "ts": time.time(), **fields}, default=str), file=sys.stderr)

    run = CloudRun(
        run_dir,
        cfg,
        settings,
        run_id=run_dir.name,
        backend_factory=lambda n: make_backend(n, settings, run_dir.name, run_dir / layout.CLOUD / "work"),
        ledger=QuotaLedger(settings.ledger_path or run_dir.parent / ".cloud-ledger.jsonl", settings.budgets),
        emit=emit,
    )
    run.control.stop = run.control.cancel = True  # settle the current session, start no other
    return run.run()

"""One table of error codes: the Elixir bridge and docs/protocol.md must know every code the worker sends."""

from __future__ import annotations

import re
from pathlib import Path

from uff_port.protocol.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[1]


def _python_codes() -> set[str]:
    return {v for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, str)}


def test_the_elixir_bridge_knows_every_wire_code() -> None:
    source = (ROOT / "elixir_bridge" / "lib" / "uff_port" / "error.ex").read_text()
    match = re.search(r"@wire_codes ~w\((.*?)\)", source, re.S)
    assert match, "error.ex lost its @wire_codes list"
    elixir = set(match.group(1).split())
    # A code missing on the Elixir side arrives there as :remote_error, and a supervisor
    # matching on it (say, :disk_full) never sees it.
    assert elixir == _python_codes(), {"missing in Elixir": _python_codes() - elixir, "unknown": elixir - _python_codes()}


def test_docs_protocol_documents_every_wire_code() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    assert _python_codes() <= documented, sorted(_python_codes() - documented)


def test_no_error_is_raised_with_a_code_outside_the_table() -> None:
    # A string literal code at a raise site is how a code drifts out of the table (and
    # reaches Elixir as :remote_error): every raise site names an ErrorCode member.
    coded = "TrainError|DataError|ZeroError|ModelError|RegistryError|CommandError|_refuse"
    literal = re.compile(rf"\b({coded})\(\s*(?:report,\s*)?\"([a-z_]+)\"")
    found = {
        f"{path.relative_to(ROOT)}: {m.group(1)}({m.group(2)!r})"
        for path in (ROOT / "uff_port").rglob("*.py")
        for m in literal.finditer(path.read_text())
    }
    assert not found, sorted(found)

"""Reading config files and trees with limits, so a hostile config costs bounded work.

A config reaches the worker's control plane as a file (`config_path`, a run's
config.yaml) or as a map on the wire. Either may be crafted: a YAML alias bomb
is a few hundred bytes that expand to billions of values once anything walks
them (pydantic, json, the YAML emitter). So a file is read with a size cap,
composed into YAML nodes (aliases stay shared there), and the node graph is
walked with aliases expanded against a budget *before* anything is
constructed; every tree is then walked once more against the same limits
before validation, however it arrived.

Errors never quote the file: a config_path may name any readable file, and a
refusal that echoed its lines would leak it. Problems name the path, a line
and column, a dotted key path (only keys that look like config names) and what
was expected.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Final

import yaml

MAX_FILE_BYTES: Final = 1 << 20
"""A config file larger than this is refused unread (presets are ~1 KiB)."""
MAX_DEPTH: Final = 32
"""Nesting of maps and lists; the schema itself is 3 deep."""
MAX_NODES: Final = 100_000
"""Values (maps, lists, scalars, keys) counted with every alias expanded."""
MAX_TEXT_BYTES: Final = 4 << 20
"""Characters of keys and strings counted with every alias expanded."""
MAX_ALIASES: Final = 1_000
"""Times a YAML map or list is reached again through an alias (nested ones too)."""

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
# Quoted input in a parser's message (an alias name, a tag); one quoted character
# (`expected ',' or ']'`) is the parser's own wording and tells the user what to fix.
_QUOTED: Final = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigLimitError(ValueError):
    """A config beyond a limit, or not a YAML/JSON map; `problem` is one 'path: message'."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def key_label(key: Any) -> str:
    """A key as it may appear in an error: config-like names verbatim, anything else not at all."""
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    if isinstance(key, str) and _NAME.fullmatch(key):
        return key
    return "<key>"


def dotted(path: list[Any] | tuple[Any, ...]) -> str:
    return ".".join(key_label(p) for p in path) or "<root>"


class _BoundedLoader(_Loader):  # type: ignore[misc, valid-type]
    """Safe YAML whose node graph is checked against the limits before construction."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        check_nodes(node)
        return self.construct_document(node)


# YAML 1.1 (PyYAML) reads `1e-3` as a string; YAML 1.2 and every user read it as a
# number. With strict schema types a string is no longer coerced to a float, so
# accept the 1.2 spelling here rather than refuse `learning_rate: 1e-3`.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def check_nodes(root: yaml.Node) -> None:
    """Walk a composed YAML document with aliases expanded; raise at the first limit passed.

    Aliases are shared node objects here, so the walk does at most MAX_NODES
    steps however far they would expand.
    """
    seen: set[int] = set()
    nodes = aliases = text = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigLimitError(f"<root>: more than {MAX_NODES} values once aliases are expanded")
        if depth > MAX_DEPTH:
            raise ConfigLimitError(f"<root>: nested deeper than {MAX_DEPTH} levels (line {node.start_mark.line + 1})")
        if isinstance(node, yaml.ScalarNode):
            text += len(node.value)
            if text > MAX_TEXT_BYTES:
                raise ConfigLimitError(f"<root>: more than {MAX_TEXT_BYTES} characters of text once aliases are expanded")
            continue
        if id(node) in seen:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise ConfigLimitError(f"<root>: more than {MAX_ALIASES} alias expansions")
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))


_SCALARS: Final = (str, int, float, bool, type(None), datetime.date)


def check_tree(obj: Any, prefix: tuple[Any, ...] = ()) -> None:
    """Check a config tree (from the wire or a file) against the limits and YAML/JSON types.

    Iterative, so a 900-deep map is refused by name instead of exhausting the
    recursion of whatever touches it next. Shared subtrees count once per use.
    Non-finite numbers are refused anywhere: no config setting means infinity.
    """
    nodes = text = 0
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, prefix)]
    while stack:
        value, path = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigLimitError(f"{dotted(prefix)}: more than {MAX_NODES} values")
        if len(path) - len(prefix) > MAX_DEPTH:
            raise ConfigLimitError(f"{dotted(path[: len(prefix) + MAX_DEPTH])}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, child in value.items():
                if not isinstance(key, str):
                    raise ConfigLimitError(f"{dotted(path)}: keys must be strings, got {type(key).__name__}")
                text += len(key)
                stack.append((child, (*path, key)))
        elif isinstance(value, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(value))
        elif isinstance(value, str):
            text += len(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigLimitError(f"{dotted(path)}: must be a finite number")
        elif not isinstance(value, _SCALARS):
            raise ConfigLimitError(
                f"{dotted(path)}: expected a map, list, string, number, boolean or null, got {type(value).__name__}"
            )
        if text > MAX_TEXT_BYTES:
            raise ConfigLimitError(f"{dotted(prefix)}: more than {MAX_TEXT_BYTES} characters of text")


def _redact(problem: str) -> str:
    """A parser's message without anything it quoted from the input."""
    first = problem.strip().splitlines()[0] if problem.strip() else "syntax error"
    return _QUOTED.sub(lambda m: m.group(0) if len(m.group(0)) <= 3 else "'...'", first)[:120]


def _where(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return ""
    return f" at line {mark.line + 1}, column {mark.column + 1}"


def read_config_bytes(path: Path, field: str = "config_path") -> bytes:
    """A regular file's bytes, at most MAX_FILE_BYTES; never blocks on a FIFO or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigLimitError(f"{field}: cannot open {str(path)!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigLimitError(f"{field}: {str(path)!r} is a directory, expected a YAML or JSON file")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigLimitError(f"{field}: {str(path)!r} is not a regular file, expected a YAML or JSON file")
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigLimitError(f"{field}: {str(path)!r} is {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_FILE_BYTES:  # it grew while we read it
            raise ConfigLimitError(f"{field}: {str(path)!r} is over the {MAX_FILE_BYTES}-byte limit")
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigLimitError(f"{field}: cannot read {str(path)!r}: {exc.strerror}") from None
    finally:
        os.close(fd)


def parse_config_text(data: bytes | str, *, name: str, as_json: bool = False, field: str = "config_path") -> Any:
    """YAML (or JSON) text -> a tree within the limits; errors never quote the text."""
    if isinstance(data, bytes):
        if b"\x00" in data:
            raise ConfigLimitError(f"{field}: {name} is a binary file, expected YAML or JSON text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigLimitError(f"{field}: {name} is not UTF-8 text (byte {exc.start}), expected YAML or JSON") from None
    else:
        text = data
    kind = "JSON" if as_json else "YAML"
    try:
        tree = json.loads(text) if as_json else yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except ConfigLimitError as exc:
        raise ConfigLimitError(f"{field}: {name}: {exc.problem.removeprefix('<root>: ')}") from None
    except json.JSONDecodeError as exc:
        raise ConfigLimitError(
            f"{field}: {name} is not valid JSON at line {exc.lineno}, column {exc.colno}: {_redact(exc.msg)}"
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigLimitError(f"{field}: {name} is not valid YAML{_where(exc)}: {_redact(exc.problem or '')}") from None
    except yaml.reader.ReaderError as exc:
        raise ConfigLimitError(f"{field}: {name} is not valid YAML: a character not allowed in YAML "
                               f"at position {exc.position}") from None
    except yaml.YAMLError as exc:
        raise ConfigLimitError(f"{field}: {name} is not valid YAML ({type(exc).__name__})") from None
    except RecursionError:
        raise ConfigLimitError(f"{field}: {name}: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an integer of 5000 digits
        raise ConfigLimitError(f"{field}: {name}: a {kind} value cannot be read ({type(exc).__name__})") from None
    return tree


def load_yaml_file(path: str | Path, field: str) -> Any:
    """A user's YAML file (gates, SLOs, a run's config.yaml) read within the same limits as a config.

    Raises ConfigLimitError (a ValueError) with one 'field: message' that never quotes the file.
    """
    p = Path(path)
    return parse_config_text(read_config_bytes(p, field), name=repr(str(p)), field=field)


def parse_yaml_value(text: str, field: str) -> Any:
    """One `key=value` value from a command line (`--set`, the client's args) as a bounded YAML scalar or tree."""
    return parse_config_text(text, name="the value", field=field)

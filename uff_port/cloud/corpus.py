"""The corpus as one content-addressed piece: uploaded once, reused by every session and run.

The users' corpus is their intellectual property and often the largest input,
so it no longer travels inside each session's bundle. It is staged once per
content (`<runs root>/.cloud-cache/corpus/<address>/`) and uploaded once as a
Kaggle dataset `uff-port-corpus-<address>` or an S3 prefix `corpus/<address>/`;
a session finds it by the address in its bundle.

With `cloud.encryption.enabled` every corpus file is sealed with AES-256-GCM
(`cryptography`) before it leaves this machine. The key (32 bytes, base64) is
read from the environment variable named by `cloud.encryption.key_env`, and
reaches the job as a secret (a Kaggle secret, or the same variable in a
SageMaker job's environment fed from Secrets Manager); it is never written into
the bundle, an event or a log. The address of an encrypted corpus is derived
from the key as well, so the provider cannot confirm a guess of the plaintext
from the dataset's name, and another key uploads a new copy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from uff_port.fsutil import atomic_write_json
from uff_port.hashing import sha256_file

CORPUS_MARKER: Final = "uff-corpus.json"
CORPUS_PREFIX: Final = "corpus:"
"""A data path in the bundle's config that names a file of the corpus piece."""
ENC_SUFFIX: Final = ".aesgcm"
_NONCE: Final = 12


def data_fields(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """The config keys whose values are data files that travel with a session, in corpus order.

    `data.path` always; for `stage: rl` also `rl.sft_path` (the SFT mix's corpus) and
    `rl.prompts` when it is a tasks file rather than the name of a shipped suite.
    """
    from uff_port.eval.suites import suite_names

    fields = [("data", "path")]
    rl = cfg.get("rl") or {}
    if cfg.get("stage") == "rl":
        if rl.get("sft_path"):
            fields.append(("rl", "sft_path"))
        if rl.get("prompts", "components") not in suite_names():
            fields.append(("rl", "prompts"))
    return fields


def field_items(cfg: dict[str, Any], section: str, key: str) -> list[str]:
    value = (cfg.get(section) or {}).get(key, "builtin:sample-corpus" if (section, key) == ("data", "path") else None)
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def set_field(cfg: dict[str, Any], section: str, key: str, items: list[str]) -> None:
    """Write `items` back: one path as a string, several as a list."""
    cfg.setdefault(section, {})[key] = items if len(items) != 1 else items[0]


class CorpusError(Exception):
    """The corpus cannot be staged or opened (no key, a wrong key, a damaged file)."""


@dataclass(frozen=True)
class Corpus:
    address: str
    """Content address: sha256 of the files (keyed with HMAC when encrypted)."""
    files: list[str]
    """Names inside the piece, in data.path order."""
    encrypted: bool
    path: Path
    """The staged piece on this machine."""

    def meta(self) -> dict[str, Any]:
        return {"address": self.address, "files": self.files, "encrypted": self.encrypted}


def load_key(env_name: str) -> bytes:
    raw = os.environ.get(env_name)
    if not raw:
        raise CorpusError(f"cloud.encryption.key_env: environment variable {env_name} is not set (32 bytes, base64)")
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        raise CorpusError(f"cloud.encryption.key_env: {env_name} is not base64") from None
    if len(key) != 32:
        raise CorpusError(f"cloud.encryption.key_env: {env_name} must decode to 32 bytes, got {len(key)}")
    return key


def _aead(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:
        raise CorpusError("cloud.encryption: the cryptography package is not installed: pip install cryptography") from exc
    return AESGCM(key)


def seal(data: bytes, key: bytes, name: str) -> bytes:
    """nonce || AES-GCM(data), the file name bound as associated data (no swapping files)."""
    nonce = os.urandom(_NONCE)
    return nonce + bytes(_aead(key).encrypt(nonce, data, name.encode("utf-8")))


def unseal(blob: bytes, key: bytes, name: str) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return bytes(_aead(key).decrypt(blob[:_NONCE], blob[_NONCE:], name.encode("utf-8")))
    except InvalidTag:
        raise CorpusError(f"{name}: decryption failed (wrong key or damaged file)") from None


def stage_corpus(sources: list[Path], cache: Path, key: bytes | None) -> Corpus:
    """Stage the corpus once per content (and key); returns where it is and its address."""
    names = [f"{i:02d}-{p.name}" for i, p in enumerate(sources)]
    plain = hashlib.sha256("".join(f"{sha256_file(p)}  {n}\n" for p, n in zip(sources, names, strict=True)).encode())
    address = plain.hexdigest() if key is None else hmac.new(key, plain.digest(), hashlib.sha256).hexdigest()
    address = address[:32]
    piece = cache / address
    marker = piece / CORPUS_MARKER
    files = [n + (ENC_SUFFIX if key else "") for n in names]
    if marker.is_file():
        return Corpus(address, files, key is not None, piece)
    tmp = cache / f".{address}.staging"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for src, name, out in zip(sources, names, files, strict=True):
        if key is None:
            shutil.copyfile(src, tmp / out)
        else:
            (tmp / out).write_bytes(seal(src.read_bytes(), key, name))
    atomic_write_json(tmp / CORPUS_MARKER, {"address": address, "files": files, "encrypted": key is not None})
    if piece.exists():
        shutil.rmtree(piece)
    tmp.rename(piece)
    return Corpus(address, files, key is not None, piece)


def find_piece(roots: list[Path], address: str) -> Path | None:
    """Where the provider mounted the corpus piece with this address."""
    for root in roots:
        if not root.is_dir():
            continue
        for marker in sorted([*root.glob(CORPUS_MARKER), *root.glob(f"*/{CORPUS_MARKER}"), *root.glob(f"*/*/{CORPUS_MARKER}")]):
            if json.loads(marker.read_text(encoding="utf-8")).get("address") == address:
                return marker.parent
    return None


def open_piece(piece: Path, meta: dict[str, Any], key: bytes | None, work: Path) -> dict[str, str]:
    """{bundle name: readable path}; encrypted files are opened into `work` (the job's private disk)."""
    out: dict[str, str] = {}
    for name in meta["files"]:
        src = piece / name
        if not src.is_file():
            raise CorpusError(f"corpus {meta['address']}: {name} is missing")
        if not meta.get("encrypted"):
            out[name] = str(src)
            continue
        if key is None:
            raise CorpusError("the corpus is encrypted and no key reached the job: set the secret named by "
                              "cloud.encryption (Kaggle secret / job environment)")
        plain_name = name[: -len(ENC_SUFFIX)]
        work.mkdir(parents=True, exist_ok=True)
        (work / plain_name).write_bytes(unseal(src.read_bytes(), key, plain_name))
        out[name] = str(work / plain_name)
    return out

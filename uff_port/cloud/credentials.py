"""Provider credentials from the usual places, and the means to keep them private.

Read from where each provider's own tools read them (`KAGGLE_USERNAME`/
`KAGGLE_KEY`, `$KAGGLE_CONFIG_DIR/kaggle.json`, `~/.kaggle/kaggle.json`;
the AWS chain of env, profiles and roles through boto3). They are never
logged, never put in an event and never packaged: `known_secrets()` feeds both
`redact()` (applied to every outgoing event) and the upload scan.
"""

from __future__ import annotations

import configparser
import json
import os
from pathlib import Path
from typing import Final

SECRET_FILE_NAMES: Final = frozenset(
    {"kaggle.json", "credentials", ".env", ".netrc", ".pgpass", "id_rsa", "id_ed25519"}
)
SECRET_SUFFIXES: Final = (".pem", ".key", ".p12")
_MIN_SECRET_LEN: Final = 8


def kaggle_config_paths() -> list[Path]:
    paths = []
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        paths.append(Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json")
    home = Path(os.path.expanduser("~"))
    paths.append(home / ".kaggle" / "kaggle.json")
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    paths.append(xdg / "kaggle" / "kaggle.json")
    return paths


def kaggle_credentials() -> tuple[str, str] | None:
    """(username, key), or None when none is configured."""
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return user, key
    for path in kaggle_config_paths():
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                return str(data["username"]), str(data["key"])
            except (ValueError, KeyError, TypeError):
                continue
    return None


def _aws_file_secrets() -> list[str]:
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    if not path.is_file():
        return []
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return []
    out = []
    for section in parser.sections():
        for key in ("aws_secret_access_key", "aws_session_token", "aws_access_key_id"):
            if parser.has_option(section, key):
                out.append(parser.get(section, key))
    return out


CORPUS_KEY_ENV = "UFF_PORT_CORPUS_KEY"
"""Where the corpus encryption key is read (default `cloud.encryption.key_env`, and inside the job)."""


def _extra_secret_envs() -> list[str]:
    """`UFF_PORT_SECRET_ENVS=A,B`: more variables whose values are secrets (e.g. another key_env)."""
    return [n for n in os.environ.get("UFF_PORT_SECRET_ENVS", "").split(",") if n]


def known_secrets() -> list[str]:
    """Every credential value this process can see (long enough to match safely)."""
    found: list[str] = []
    creds = kaggle_credentials()
    if creds:
        found.append(creds[1])
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "KAGGLE_KEY", CORPUS_KEY_ENV,
                 *_extra_secret_envs()):
        if os.environ.get(name):
            found.append(os.environ[name])
    found.extend(_aws_file_secrets())
    return sorted({s for s in found if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for secret in known_secrets() if secrets is None else secrets:
        text = text.replace(secret, "***")
    return text


def is_secret_file(name: str) -> bool:
    return name in SECRET_FILE_NAMES or name.endswith(SECRET_SUFFIXES)

"""Model architecture as the planner needs it: read from a config.json, never from weights.

`plan` must answer before anything is downloaded, so the two DeepSeek-Coder
sizes are built in (dimensions of deepseek-ai/deepseek-coder-{1.3b,6.7b}-base),
a local checkout is read from its config.json, and a hub id is looked up in the
local HF cache only (no network).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

DEFAULT_TARGETS: Final = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_HUB_ID_RE: Final = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_COMMIT_RE: Final = re.compile(r"^[0-9a-f]{40}$")


class ArchError(ValueError):
    """A model whose architecture cannot be read offline."""


@dataclass(frozen=True)
class Arch:
    """The dimensions of a Llama-architecture decoder that memory depends on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    tie_embeddings: bool = False
    head_dim: int = 0
    hub_id: str | None = None
    """Where the weights come from (written into generated configs)."""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder-layer Linear, by HF module name."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden  # two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @property
    def n_params(self) -> int:
        return self.embed_params + self.layers * self.layer_params + self.hidden + self.head_params

    def lora_params(self, r: int, targets: tuple[str, ...] | list[str]) -> int:
        """A (r x in) + B (out x r) per targeted Linear per layer; `lm_head` counts once."""
        shapes = self.linear_shapes()
        per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in set(targets) if t in shapes)
        head = r * (self.hidden + self.vocab) if "lm_head" in targets else 0
        return self.layers * per_layer + head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"n_params": self.n_params}


# Published configs of the base checkpoints (config.json on the hub): both use
# linear RoPE scaling x4 to 16k positions and untied embeddings.
BUILTIN: Final = {
    "deepseek-coder-1.3b": Arch(
        name="deepseek-coder-1.3b", hidden=2048, layers=24, heads=16, kv_heads=16,
        intermediate=5504, vocab=32256, max_positions=16384,
        hub_id="deepseek-ai/deepseek-coder-1.3b-base",
    ),
    "deepseek-coder-6.7b": Arch(
        name="deepseek-coder-6.7b", hidden=4096, layers=32, heads=32, kv_heads=32,
        intermediate=11008, vocab=32256, max_positions=16384,
        hub_id="deepseek-ai/deepseek-coder-6.7b-base",
    ),
    # The training plane's `builtin:tiny-llama` (uff_port/training/builtin.py).
    "builtin:tiny-llama": Arch(
        name="builtin:tiny-llama", hidden=128, layers=2, heads=4, kv_heads=2,
        intermediate=352, vocab=1024, max_positions=2048, hub_id="builtin:tiny-llama",
    ),
}
# Hub ids of the same checkpoints (base and instruct share dimensions).
_ALIASES: Final = {
    f"deepseek-ai/deepseek-coder-{size}-{kind}": f"deepseek-coder-{size}"
    for size in ("1.3b", "6.7b")
    for kind in ("base", "instruct")
}
# The training plane's random-weight builds of the same architectures (training/real_arch.py).
_ALIASES.update({f"builtin:deepseek-coder-{size}-random": f"deepseek-coder-{size}" for size in ("1.3b", "6.7b")})


def arch_from_config(cfg: dict[str, Any], name: str, hub_id: str | None = None) -> Arch:
    """Read a Llama-style config.json map; missing required keys are named in the error."""
    if not isinstance(cfg, dict):
        raise ArchError(f"model: config of {name!r} is not a JSON object")
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] <= 0]
    if missing:
        raise ArchError(
            f"model: config of {name!r} lacks positive integer {missing}; a Llama-architecture "
            "config.json is expected"
        )
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if not isinstance(kv, int) or not isinstance(head_dim, int) or kv <= 0 or head_dim <= 0:
        raise ArchError(f"model: config of {name!r} has invalid num_key_value_heads/head_dim")
    return Arch(
        name=name,
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=kv,
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        max_positions=int(cfg.get("max_position_embeddings") or 0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=head_dim,
        hub_id=hub_id,
    )


def _read_config_json(path: Path, name: str, hub_id: str | None) -> Arch:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArchError(f"model: cannot read {str(path)!r}: {exc}") from None
    return arch_from_config(data, name, hub_id)


def hf_cache_dir() -> Path:
    """The hub cache the HF libraries use (HF_HUB_CACHE > HF_HOME/hub > ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def _cached_config(hub_id: str, revision: str | None) -> Path | None:
    repo = hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    rev = revision or "main"
    commit = rev if _COMMIT_RE.match(rev) else None
    if commit is None:
        ref = repo / "refs" / rev
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except OSError:
            return None
    cfg = repo / "snapshots" / commit / "config.json"
    return cfg if cfg.is_file() else None


def resolve_arch(spec: str, revision: str | None = None) -> Arch:
    """Builtin name, hub id (cache only) or local directory/config.json -> Arch."""
    if not isinstance(spec, str) or not spec.strip():
        raise ArchError("model: expected a builtin name, a hub id or a local path")
    spec = spec.strip()
    key = _ALIASES.get(spec, spec)
    if key in BUILTIN:
        return BUILTIN[key]
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ArchError(f"model: {spec!r} is a directory without config.json")
        return _read_config_json(local / "config.json", local.name, str(local))
    if local.is_file() and local.name.endswith(".json"):
        return _read_config_json(local, local.parent.name, str(local.parent))
    if _HUB_ID_RE.match(spec):
        cached = _cached_config(spec, revision)
        if cached is None:
            raise ArchError(
                f"model: {spec!r} is not in the local HF cache ({hf_cache_dir()}); download it "
                f"first or pass a local directory; builtin: {sorted(k for k in BUILTIN if ':' not in k)}"
            )
        return _read_config_json(cached, spec, spec)
    raise ArchError(
        f"model: {spec!r} is neither a builtin ({sorted(k for k in BUILTIN if ':' not in k)}), "
        "a local directory with config.json, nor a hub id like 'org/name'"
    )

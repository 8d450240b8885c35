"""`uff-port generate | chat | merge` on a real tiny run, through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uff_port.hashing import sha256_file

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPTS = ("def add(a, b):", "class Stack:")


def cli(*args: str, env: dict[str, str], stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "uff_port.cli", *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=240, cwd=cwd)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("UFF_PORT_CACHE", str(tmp_path_factory.getbasetemp() / "uff-cache"))
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT)
    e["UFF_PORT_REGISTRY"] = str(tmp_path_factory.getbasetemp() / "no-registry")
    return e


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """Eight steps at a high learning rate: an adapter that visibly changes the model."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    proc = cli("train", "tiny", "--run-dir", str(out), "--quiet", "--set", "training.max_steps=8",
               "--set", "training.learning_rate=0.02", "--set", "checkpoint.every_steps=8",
               "--set", "eval.every_steps=8", "--set", "data.seq_len=128", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    return out


def _generate(target: str, env: dict[str, str], *extra: str) -> list[dict[str, str]]:
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    proc = cli("generate", target, *args, "--max-new-tokens", "24", "--json", *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr  # no library chatter on the terminal
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_generate_is_deterministic_and_the_adapter_changes_the_output(run_dir: Path, env: dict[str, str]) -> None:
    first = _generate(str(run_dir), env)
    assert [r["prompt"] for r in first] == list(PROMPTS)
    assert all(r["completion"] for r in first)
    # The same greedy call, and the adapter named by its final/ directory: the same text.
    assert _generate(str(run_dir / "final"), env) == first
    base = _generate("builtin:tiny-llama", env)
    assert [r["completion"] for r in base] != [r["completion"] for r in first]


def test_generate_refuses_what_it_cannot_load(tmp_path: Path, run_dir: Path, env: dict[str, str]) -> None:
    proc = cli("generate", str(tmp_path / "nowhere"), "--prompt", "x", env=env)
    assert proc.returncode == 4 and "expected a run directory" in proc.stderr
    # A pickled adapter is not loaded, even next to a valid config.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((run_dir / "final" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    proc = cli("generate", str(pickled), "--prompt", "x", env=env)
    assert proc.returncode == 4 and "pickled weights are not loaded" in proc.stderr
    proc = cli("generate", str(run_dir), "--prompt", "x", "--temperature", "-1", env=env)
    assert proc.returncode == 2 and "temperature" in proc.stderr


@pytest.mark.long  # generate covers the same load and sampling path in CI
def test_chat_answers_each_line_and_keeps_the_conversation(run_dir: Path, env: dict[str, str]) -> None:
    script = "def add(a, b):\n\n/reset\nclass Stack:\n/exit\nnever read\n"
    proc = cli("chat", str(run_dir), "--max-new-tokens", "12", env=env, stdin=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "(conversation cleared)" in lines
    cleared = lines.index("(conversation cleared)")
    # One reply before /reset, one after; the blank line and the text after /exit are not answered.
    assert cleared >= 1 and len(lines) - cleared - 1 >= 1
    again = cli("chat", str(run_dir), "--max-new-tokens", "12", env=env, stdin=script)
    assert again.stdout == proc.stdout  # greedy: the same conversation


def test_merge_gives_a_standalone_model_with_the_adapters_logits(run_dir: Path, tmp_path: Path,
                                                                  env: dict[str, str]) -> None:
    out = tmp_path / "merged"
    proc = cli("merge", str(run_dir), "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "merged" and manifest["base_model"] == "builtin:tiny-llama"
    artifact = json.loads((run_dir / "final" / "artifact.json").read_text())
    assert manifest["adapter_id"] == artifact["artifact_id"]
    assert set(manifest["files"]) == names - {"manifest.json"}
    for rel, entry in manifest["files"].items():
        assert sha256_file(out / rel) == entry["sha256"]
    # Plain transformers loads it alone; its logits are base + adapter's.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        "from uff_port.training.builtin import ensure_tiny_llama\n"
        "x = torch.arange(3, 70).unsqueeze(0)\n"
        "merged = AutoModelForCausalLM.from_pretrained(sys.argv[2], use_safetensors=True).eval()\n"
        "base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), use_safetensors=True).eval()\n"
        "with torch.no_grad(): ref0 = base(x).logits\n"
        "peft = PeftModel.from_pretrained(base, sys.argv[1]).eval()\n"
        "with torch.no_grad(): a, b = peft(x).logits, merged(x).logits\n"
        "print((a - b).abs().max().item(), (a - ref0).abs().max().item())\n"
    )
    check = subprocess.run([PY, "-c", code, str(run_dir / "final"), str(out)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    diff, effect = map(float, check.stdout.split()[-2:])
    assert diff < 1e-4 and effect > 1e-3  # merged == base+adapter, and the adapter did something
    # Never over an existing directory; never for a target without an adapter.
    again = cli("merge", str(run_dir), "--out", str(out), env=env)
    assert again.returncode == 2 and "already exists" in again.stderr
    plain = cli("merge", "builtin:tiny-llama", "--out", str(tmp_path / "m2"), env=env)
    assert plain.returncode == 2 and "no adapter" in plain.stderr and not (tmp_path / "m2").exists()

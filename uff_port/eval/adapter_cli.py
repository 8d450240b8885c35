"""`uff-port generate | chat | merge`: try a trained adapter, and fold it into its base.

TARGET is what `uff-port eval` takes (uff_port.eval.generate.resolve_target): a
run directory, its `final/` adapter, an adapter or model directory, a
registered artifact (id, prefix or alias; $UFF_PORT_REGISTRY, else ./registry)
or builtin:tiny-llama. Weights are read from safetensors only. Nothing heavy is
imported at module level. Exit codes: 0 done, 2 bad arguments, 4 target not found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final, TextIO

EXIT_ARGS: Final = 2
EXIT_NOT_FOUND: Final = 4
CHAT_COMMANDS: Final = ("/exit", "/quit", "/reset")
DTYPES: Final = ("auto", "float32", "bfloat16", "float16")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    p.add_argument("target", help="run directory, its final/ adapter, adapter or model directory, "
                                  "registered artifact id/alias, or builtin:tiny-llama")
    p.add_argument("--base-model", default=None, help="base model directory for an adapter target")
    p.add_argument("--device", default="cpu")


def _sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, deterministic")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut each completion at this text (repeatable)")


def register(sub: Any) -> None:
    g = sub.add_parser("generate", help="complete prompts with a trained adapter (greedy by default)")
    _common(g)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: read stdin)")
    _sampling(g, 128)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a trained adapter turn by turn (/reset, /exit)")
    _common(c)
    _sampling(c, 256)
    c.add_argument("--system", default=None, help="a system message opening the conversation")
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("merge", help="fold the adapter into its base: a full model for transformers and vLLM")
    _common(m)
    m.add_argument("--out", type=Path, required=True, help="new directory for the merged model")
    m.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' dtype (default: the base's own)")
    m.set_defaults(func=cmd_merge)


def quiet_libraries(device: str) -> None:
    """Keep transformers/peft/bitsandbytes/DeepSpeed chatter (warnings, load bars) off the terminal.

    Set before those libraries are imported: they read these at import time.
    """
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "Setting accelerator to CPU" notice
    warnings.filterwarnings("ignore")
    root = logging.getLogger()
    root.addHandler(logging.NullHandler())  # no last-resort printing of library warnings
    root.setLevel(logging.ERROR)


def _load(args: argparse.Namespace, dtype: str = "float32") -> tuple[Any, Any, Any] | int:
    if not args.verbose:
        quiet_libraries(args.device)
    from uff_port.eval.generate import TargetError, load, resolve_target

    try:
        target = resolve_target(args.target, args.base_model)
        model, tokenizer = load(target, args.device, dtype, safetensors_only=True)
    except (TargetError, OSError) as exc:
        print(f"target: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    return target, model, tokenizer


def _gen_config(args: argparse.Namespace) -> Any:
    from uff_port.eval.generate import GenConfig

    return GenConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     batch_size=1, seed=args.seed, stop=tuple(args.stop))


def _check_sampling(args: argparse.Namespace) -> str | None:
    try:
        _gen_config(args)
    except ValueError as exc:
        return str(exc)
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    from uff_port.eval.generate import generate

    prompts = list(args.prompt) or [sys.stdin.read()]
    if problem := _check_sampling(args):
        print(f"generate: {problem}", file=sys.stderr)
        return EXIT_ARGS
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    _target, model, tokenizer = loaded
    outs = generate(model, tokenizer, prompts, _gen_config(args), device=args.device)
    for prompt, (completion, *_) in zip(prompts, outs, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            print(completion)
    return 0


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation as the model expects it: its chat template, else plain role-tagged turns."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return turns + "Assistant:"


def run_chat(model: Any, tokenizer: Any, cfg: Any, *, device: str, system: str | None,
             stdin: TextIO, stdout: TextIO) -> None:
    """The REPL: one line in, one reply out, the whole conversation as context; ends at EOF or /exit."""
    from uff_port.eval.generate import generate

    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(opening)
            stdout.write("(conversation cleared)\n")
            stdout.flush()
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, [chat_prompt(tokenizer, messages)], cfg, device=device)[0][0].strip()
        messages.append({"role": "assistant", "content": reply})
        stdout.write(reply + "\n")
        stdout.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    if problem := _check_sampling(args):
        print(f"chat: {problem}", file=sys.stderr)
        return EXIT_ARGS
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    target, model, tokenizer = loaded
    if sys.stdin.isatty():
        print(f"chatting with {target.name} ({', '.join(CHAT_COMMANDS)}; Ctrl-D ends)", file=sys.stderr)
    try:
        run_chat(model, tokenizer, _gen_config(args), device=args.device, system=args.system,
                 stdin=sys.stdin, stdout=sys.stdout)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def adapter_id(adapter_dir: Path) -> str:
    """The adapter's artifact id: its artifact.json's, else computed the registry's way."""
    from uff_port.hashing import tree_manifest
    from uff_port.registry.manifest import MANIFEST_NAME, artifact_id
    from uff_port.registry.runmanifest import content_excludes

    try:
        recorded = json.loads((adapter_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("artifact_id")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and len(recorded) == 64:
        return recorded
    return artifact_id(tree_manifest(adapter_dir, exclude=content_excludes(adapter_dir)))


def cmd_merge(args: argparse.Namespace) -> int:
    if args.out.exists() or args.out.is_symlink():
        print(f"--out: {args.out} already exists; pick a new directory", file=sys.stderr)
        return EXIT_ARGS
    loaded = _load(args, dtype=args.dtype)
    if isinstance(loaded, int):
        return loaded
    target, model, tokenizer = loaded
    if target.adapter_path is None:
        print(f"target {args.target!r}: a plain model, no adapter to merge", file=sys.stderr)
        return EXIT_ARGS
    from uff_port import __version__
    from uff_port.training.export import save_merged

    adapter = Path(target.adapter_path)
    declared = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    meta = {
        "base_model": declared.get("base_model_name_or_path") or target.model_path,
        "base_model_path": str(target.model_path),
        "adapter": str(adapter),
        "adapter_id": adapter_id(adapter),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "uff_port": __version__,
    }
    try:
        out = save_merged(model, tokenizer, args.out, meta=meta)
    except FileExistsError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_ARGS
    print(f"merged model: {out} (adapter {meta['adapter_id'][:12]} on {meta['base_model']}, {meta['dtype']})")
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) or `vllm serve {out}`")
    return 0

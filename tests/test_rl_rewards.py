"""RL rewards from the evaluator: weighted sums, the sandboxed tests, and a pass no completion can forge."""

from __future__ import annotations

import pytest

from uff_port.core.config import validate_config
from uff_port.eval.suites import Task
from uff_port.training.rewards import Rewards

TASK = Task(task_id="t/add", prompt="def add(a, b):\n", tests="def check(f):\n    assert f(2, 3) == 5\n",
            entry_point="add")
HONEST = "    return a + b\n"
WRONG = "    return a - b\n"
# Forgeries of the sandbox's pass marker: each searches what the program can reach for the
# nonce (its frames and their locals, the interpreter's objects, its files), prints every
# candidate as the pass line would, and leaves with status 0 before the tests run.
CHEATS = {
    "frames": (
        "    import os, sys, re\n"
        "    f, seen = sys._getframe(), []\n"
        "    while f is not None:\n"
        "        for v in list(f.f_locals.values()) + list(f.f_globals.values()):\n"
        "            for s in (v if isinstance(v, dict) else {'': v}).values():\n"
        "                for x in ([s] if isinstance(s, (str, bytes)) else []):\n"
        "                    x = x.decode('latin-1') if isinstance(x, bytes) else x\n"
        "                    seen += re.findall(r'[0-9a-f]{32}', x)\n"
        "        f = f.f_back\n"
        "    os.write(2, ('\\n'.join(seen[-1:] or ['0' * 32]) + '\\n').encode())\n"
        "    os._exit(0)\n"
    ),
    "gc": (
        "    import gc, os, re\n"
        "    hits = [m for o in gc.get_objects() if isinstance(o, dict) for v in list(o.values())\n"
        "            if isinstance(v, str) for m in re.findall(r'^[0-9a-f]{32}$', v)]\n"
        "    os.write(2, ('\\n' + (hits[-1] if hits else '') + '\\n').encode())\n"
        "    os._exit(0)\n"
    ),
    "files": (
        "    import os\n"
        "    text = ''.join(open(n, errors='replace').read() for n in os.listdir('.') if os.path.isfile(n))\n"
        "    os.write(2, ('\\n' + text.strip().splitlines()[-1] + '\\n').encode())\n"
        "    os._exit(0)\n"
    ),
    "early_exit": "    import os\n    os._exit(0)\n",
}


@pytest.fixture(scope="module")
def rewards() -> Rewards:
    cfg = validate_config({"stage": "rl", "rl": {"reward_workers": 2, "reward_timeout": 20, "rewards": [
        {"name": "tests", "weight": 2.0}, {"name": "parses", "weight": 0.5},
        {"name": "length", "weight": -0.001, "options": {"budget": 1}}]}})
    r = Rewards(cfg.rl)
    yield r
    r.close()


def test_weighted_sum_of_named_rewards(rewards: Rewards) -> None:
    totals, per, passed = rewards.score([TASK, TASK], [HONEST, WRONG])
    assert passed == [True, False]
    assert per["tests"] == [1.0, 0.0] and per["parses"] == [1.0, 1.0]
    assert per["length"][0] == 0.0  # over a 1-char budget, unshaped
    assert totals == [2.0 + 0.5, 0.5]


def test_no_cheating_completion_is_rewarded(rewards: Rewards) -> None:
    names = list(CHEATS)
    totals, per, passed = rewards.score([TASK] * (len(names) + 1), [CHEATS[n] for n in names] + [HONEST])
    assert passed[-1] is True  # the same sandbox passes an honest completion
    forged = [n for n, p in zip(names, passed, strict=False) if p]
    assert forged == [], f"forged passes: {forged}"
    assert all(per["tests"][i] == 0.0 for i in range(len(names)))


def test_plugin_scorer_and_format(tmp_path) -> None:  # noqa: ANN001
    plug = tmp_path / "score.py"
    plug.write_text("def shouty(task, completion):\n    return sum(c.isupper() for c in completion) / max(1, len(completion))\n")
    cfg = validate_config({"stage": "rl", "rl": {"rewards": [
        {"name": f"{plug}:shouty", "weight": 1.0}, {"name": "format", "weight": 1.0,
                                                     "options": {"pattern": "^AB", "mode": "search"}}]}})
    r = Rewards(cfg.rl)
    totals, per, _ = r.score([TASK, TASK], ["ABCD", "abcd"])
    assert per["shouty"] == [1.0, 0.0] and per["format"] == [1.0, 0.0] and totals == [2.0, 0.0]
    assert r.sandbox is None  # no `tests`: no sandbox is started

"""Worker commands beyond the core set, each run in a short-lived child process.

Names map to `module:function`; the worker never imports these modules itself
(they may import torch, read gigabytes or take minutes), so adding a command
never slows the control plane. See docs/internals.md section 2.
"""

from __future__ import annotations

from typing import Final

EXTENSION_COMMANDS: Final[dict[str, str]] = {
    "plan": "uff_port.planner.commands:plan",
    "register": "uff_port.registry.commands:register",
    "promote": "uff_port.registry.commands:promote",
    "rollback": "uff_port.registry.commands:rollback",
    "releases": "uff_port.registry.commands:releases",
    "deploy": "uff_port.registry.deploy_commands:deploy",
    "deploy_rollback": "uff_port.registry.deploy_commands:deploy_rollback",
    "plan_week": "uff_port.cloud.commands:plan_week",
    "cloud_status": "uff_port.cloud.commands:cloud_status",
    "eval": "uff_port.eval.commands:eval_command",
    "campaign_plan": "uff_port.campaign.commands:campaign_plan",
    "campaign_release": "uff_port.campaign.commands:campaign_release",
}

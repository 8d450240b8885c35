#!/usr/bin/env python
"""Command-centre step: fuse the hf, gcp and aws manifests into one release.

    python scripts/federated_orchestrator.py --hf-manifest A.json \\
        --gcp-manifest B.json --aws-manifest C.json --output fused_manifest.json

The same as `uff-port federate --manifest hf=A.json --manifest gcp=B.json
--manifest aws=C.json --output fused_manifest.json`, with the flags the
release runbook uses. Exit codes are those of the registry (docs/registry.md).
"""

from __future__ import annotations

import argparse
import sys

from uff_port.registry.cli import cmd_federate
from uff_port.registry.errors import RegistryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-manifest", help="manifest from the Hugging Face Hub repo")
    parser.add_argument("--gcp-manifest", help="manifest from the GCP/Kaggle site")
    parser.add_argument("--aws-manifest", help="manifest from the SageMaker site")
    parser.add_argument("--output", required=True, help="where to write the fused release descriptor")
    parser.add_argument("--version", help="release version X.Y.Z (default: highest artifact version)")
    parser.add_argument("--gates", help="gates YAML (default configs/gates.yaml)")
    parser.add_argument("--no-gates", action="store_true")
    parser.add_argument("--baseline", help="the current release descriptor: quality is judged against it")
    parser.add_argument("--created-at", help="timestamp to record (omitted by default)")
    args = parser.parse_args(argv)
    args.manifest = [
        f"{name}={path}"
        for name, path in (("hf", args.hf_manifest), ("gcp", args.gcp_manifest), ("aws", args.aws_manifest))
        if path
    ]
    if not args.manifest:
        parser.error("give at least one of --hf-manifest, --gcp-manifest, --aws-manifest")
    try:
        return cmd_federate(args)
    except RegistryError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

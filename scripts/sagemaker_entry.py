#!/usr/bin/env python
"""SageMaker script-mode entry (`entry_point="sagemaker_entry.py"` with the SDK).

The backend itself starts `python -m uff_port.cloud.entry` through
ContainerEntrypoint; this file is for users who launch jobs with the
sagemaker SDK's estimators instead. It installs the bundled uff-port wheel
offline when the image lacks it, then runs the same entry point.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys


def main() -> int:
    try:
        import uff_port  # noqa: F401
    except ImportError:
        bundle = os.environ.get("SM_CHANNEL_BUNDLE", "/opt/ml/input/data/bundle")
        wheels = sorted(glob.glob(os.path.join(bundle, "uff_port-*.whl")))
        if not wheels:
            print("sagemaker_entry: no uff_port wheel in the bundle channel", file=sys.stderr)
            return 3
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", wheels[-1]])
    from uff_port.cloud.entry import main as entry_main

    return entry_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""The torch-free core every plane shares and that imports no plane.

- `uff_port.core.config`: the config schema and its validation (`config_io`: bounded reading).
- `uff_port.core.layout`: the names of the files and directories of a run directory.
- `uff_port.core.checkpoint_store`: the only code that reads or writes `checkpoints/`.
- `uff_port.core.exits`: the exit codes of the trainer, the worker and the cloud runners.

Nothing here imports torch, transformers or peft, or any of `server`,
`training`, `planner`, `registry`, `cloud` (tests/test_imports.py holds that).
"""

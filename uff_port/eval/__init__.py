"""Code evaluation: run completions against tests in a sandbox, score, compare.

Torch-free except `generate` (imported only when a model must write the
completions). See docs/eval.md.
"""

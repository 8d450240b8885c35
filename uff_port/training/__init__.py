"""Data plane: the trainer process (config, data, model, loop, checkpoints).

Knows nothing of Elixir or the worker: it reports through a channel of events
and obeys checkpoint/stop requests. Modules that the worker imports
(`config`, `checkpoint_store`) never import torch.
"""

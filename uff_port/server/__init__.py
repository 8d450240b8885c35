"""Control plane: the Port worker (`uff-port serve`).

Knows nothing of models: it validates requests, owns the trainer process
group, forwards its events and keeps heartbeats flowing whatever training does.
Never imports torch.
"""

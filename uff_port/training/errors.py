"""The trainer's coded failures, shared by the recipe and its step engines."""

from __future__ import annotations


class TrainError(Exception):
    """A coded failure. `final`: resuming would only repeat it (never resumable)."""

    def __init__(self, code: str, message: str, resumable: bool = False, *, final: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.resumable, self.final = code, message, resumable and not final, final


class NonFiniteStep(Exception):
    """A step's loss or gradient norm was NaN/Inf. Raised before the optimizer moved, so the
    batch can be skipped, unless `stepped` (an engine that steps inside its own loop)."""

    def __init__(self, loss: float, grad_norm: float | None, *, stepped: bool = False) -> None:
        super().__init__(f"loss {loss}, grad norm {grad_norm}")
        self.loss, self.grad_norm, self.stepped = loss, grad_norm, stepped

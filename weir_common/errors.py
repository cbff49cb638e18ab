"""Errors that reach an operator: one line that says what failed and why.

`retryable` tells the caller (the CNI plugin, the reconcile loop) whether
trying again later can help, or whether the input itself must change.
"""


class WeirError(Exception):
    """A failure with a message fit for an operator's terminal."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(WeirError):
    """The request itself is wrong; retrying the same thing fails the same way."""


class NodeSetupError(WeirError):
    """The node lacks something (a binary, a kernel feature); fix the node, then retry."""


class TransientError(WeirError):
    """Something changed under us (a netns vanished, a lock was held); retrying may help."""

    retryable = True

"""The exceptions shardcut raises for bad input, one kind per thing that can be wrong.

Every message is one line that names the file (or layer) and the problem, so the CLI can print
it as is and exit with code 2. A message names the library's parameters (`create_pr`, `protect`),
never command-line flags, and lists them in `params`: the CLI shows them as its flags. Every kind
is a `ShardcutError`, so `except ShardcutError` still catches them all; a caller that must tell
them apart catches the kind.

    >>> try:
    ...     shardcut.prune("model", "out", plan)
    ... except OutputExistsError:
    ...     ...
"""

from __future__ import annotations

from os import PathLike


class ShardcutError(Exception):
    """Bad input: a malformed file, an inconsistent plan, an unsupported layout.

    `params`: the parameters the message names, by their Python names (the CLI maps each to its
    flag when it prints the message).

    Example:
        >>> raise ShardcutError("plan.json: layer 3 keeps 3 experts, other layers keep 4")
        >>> raise PlanError("protect: layer 9 is not a MoE layer", params=("protect",))
    """

    def __init__(
        self, message: str, path: str | PathLike | object | None = None, *, params: tuple[str, ...] = ()
    ) -> None:  # object: a Hub RepoRef
        self.path = str(path) if path is not None else None
        self.params = tuple(params)
        super().__init__(f"{path}: {message}" if path is not None else message)


class CheckpointError(ShardcutError):
    """The checkpoint (shards, index, config, side files) is malformed or contradicts itself."""


class PlanError(ShardcutError):
    """A plan is malformed or breaks a routing constraint of the checkpoint."""


class ScoresError(ShardcutError):
    """A score file (native or imported) is malformed or does not fit the model."""


class DataError(ShardcutError):
    """Calibration or evaluation data cannot be read or formatted."""


class OutputError(ShardcutError):
    """An output path is unusable: it exists, is one of the inputs, or cannot be written."""


class OutputExistsError(OutputError):
    """The output exists and overwriting was not asked for."""


class HubError(ShardcutError):
    """The Hugging Face Hub refused or failed a request."""

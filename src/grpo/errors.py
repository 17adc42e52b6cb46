"""The errors ``grpo`` raises for bad input, each a one-line message naming the field or
file, the value, and what was expected.

``grpo``'s command line turns every ``GRPOError`` into that one line and exit code 2
(``--debug`` shows the traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class GRPOError(Exception):
    """Base of the errors caused by what the user gave: config, data, model, reward
    functions, checkpoints, command-line arguments."""


class DataError(GRPOError, ValueError):
    """A training data file is missing, empty, malformed or holds an unusable prompt."""


class ModelError(GRPOError, ValueError):
    """A model path does not exist, lacks weights or a tokenizer, or cannot hold the run's
    lengths."""


class CheckpointError(GRPOError, ValueError):
    """No intact checkpoint to resume from, or one that does not match the config."""


class NonFiniteError(GRPOError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class UsageError(GRPOError, ValueError):
    """A command-line argument or output location that cannot work."""

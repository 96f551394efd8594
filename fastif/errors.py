"""User-facing errors: each message names the problem and the fix.

The command line prints a FastifError as one paragraph (no traceback) and exits
non-zero; anything else is a bug and keeps its traceback.
"""


class FastifError(Exception):
    """Base class of errors caused by input, configuration or environment."""

    exit_code = 2


class ConfigError(FastifError):
    """A config value is missing, misspelt or out of range."""


class InputError(FastifError):
    """A file, model or dataset given as input is missing or malformed."""


class RunError(FastifError):
    """A run folder is locked, incomplete or does not match the request."""


class IndexMismatchError(RunError):
    """A kNN index was built from another model checkpoint or dataset."""


class SolverDivergenceError(FastifError):
    """An iterative inverse-HVP solver diverged (growing norm, inf or NaN)."""

"""Base error types shared by every sub-package.

Every error a user can cause (bad input, bad config, bad checkpoint, Slurm refusing) derives from HpcllmError and
carries a message that says what is wrong and what to fix. The CLI turns these into one clear line and a non-zero
exit, never a traceback.
"""


class HpcllmError(Exception):
    """Base class for errors with a user-facing message."""

    exit_code = 1


class ConfigError(HpcllmError):
    """A configuration file or value is invalid."""

    exit_code = 2

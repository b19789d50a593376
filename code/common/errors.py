"""How the command-line scripts end on bad input: one line naming the file or flag, no traceback.

Bad input surfaces as ``ValueError`` / ``OSError`` (``FileNotFoundError`` ...) / ``KeyError``, or
as an exception class marked ``user_error = True`` (``CheckpointError``, ``NonFiniteLoss``).
``SSCD_DEBUG=1`` shows the traceback instead.
"""
import os
import sys

INPUT_ERRORS = (ValueError, OSError, KeyError)


class DataReadError(ValueError):
    """Training data that cannot be read when a batch needs it (a slice file gone missing or damaged
    after start-up); the message names the file. The training loop saves ``last.pth`` first."""


def is_user_error(err):
    return isinstance(err, INPUT_ERRORS) or getattr(type(err), "user_error", False)


def run_cli(main, argv=None):
    """``main(argv)``; a bad-input exception ends the process with ``error: <message>`` (status 1)."""
    try:
        return main(argv)
    except Exception as err:
        if not is_user_error(err) or os.environ.get("SSCD_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        sys.exit(f"error: {message}")

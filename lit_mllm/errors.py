"""How every console script reports a user's mistake: one line on stderr, no traceback.

A wrong setting, a missing file or a damaged checkpoint is something the user can fix from a
one-line message; a traceback hides that line under 50 lines of library frames. Bugs (any other
exception) keep their traceback. ``--debug`` or ``LIT_MLLM_DEBUG=1`` shows the traceback of
user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from types import TracebackType

DEBUG_ENV = "LIT_MLLM_DEBUG"
DEBUG_FLAG = "--debug"
DEBUG_HELP = f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
PACKAGE = __name__.split(".")[0]


class UsageError(ValueError):
    """A setting the user gave cannot work (exit code 2, like an argument-parsing error)."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def pop_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there (for parsers we do not own)."""
    rest = [arg for arg in argv if arg != DEBUG_FLAG]
    return rest, len(rest) != len(argv)


def _raised_in_package(error: BaseException) -> bool:
    """Whether our own code raised it (a check of ours), rather than a library deep inside."""
    tb: TracebackType | None = error.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    module = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def exit_code(
    error: BaseException, user_errors: tuple[type[BaseException], ...], ours_only: bool = True
) -> int | None:
    """2 for a :class:`UsageError`, 1 for another user error, ``None`` for a bug.

    ``ours_only``: a ``ValueError`` from inside a library is a bug report's material, not a
    message for the user, so only errors our own code raised count.
    """
    if isinstance(error, UsageError):
        return 2
    if isinstance(error, user_errors) and (not ours_only or _raised_in_package(error)):
        return 1
    return None


def run_reporting_errors(
    prog: str,
    body: Callable[[], int | None],
    *,
    debug: bool = False,
    user_errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
    ours_only: bool = True,
    code: int | None = None,
) -> int:
    """Run ``body``; a user error becomes ``prog: error: message`` on stderr and an exit code.

    ``code`` fixes the exit code of every user error (``lit-mllm-score`` documents 2); otherwise
    :func:`exit_code` picks it. Exceptions that are not user errors propagate unchanged.
    """
    try:
        result = body()
    except Exception as error:
        status = exit_code(error, user_errors, ours_only)
        if status is None or debug_requested(debug):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return code if code is not None else status
    return 0 if result is None else int(result)

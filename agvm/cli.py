"""One error line for every command line tool: ``sys.exit(agvm.cli.run(main))``.

``run`` calls ``main(argv)`` without ``--debug``. An exception becomes one line on stderr,
``error: <what is wrong and what to do>``, and exit status 2 (or the exception's ``exit_code``); with
``--debug`` the exception propagates with its traceback. The line is the exception's own message (several
lines joined, at most 1000 characters), so code that raises for a person says there what to do. Standard
library only.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence

__all__ = ["run", "one_line", "DEBUG_FLAG"]

DEBUG_FLAG = "--debug"
MAX_CHARS = 1000  # longer messages are cut (the whole one is in the --debug traceback)


def one_line(err: BaseException) -> str:
    """A one-line description of ``err`` (the file and line of a syntax error, the key of a KeyError)."""
    if isinstance(err, SyntaxError) and err.filename not in (None, "<unknown>", "<string>"):
        return f"{err.filename}, line {err.lineno}: invalid Python syntax ({err.msg}); fix that line"
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    if isinstance(err, KeyError) and " " not in text:
        return f"KeyError: missing key {text!r}"
    text = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())  # a message of several lines, joined
    if not text:
        return f"{type(err).__name__} (no message)"
    if not isinstance(err, (OSError, ValueError, RuntimeError, LookupError, TypeError)):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + " [...]"


def run(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Exit status of ``main(argv)`` (``sys.argv[1:]`` by default); see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        rc = main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the point of this wrapper
        if debug:
            raise
        print(f"error: {one_line(err)} (add {DEBUG_FLAG} for the traceback)", file=sys.stderr, flush=True)
        return int(getattr(err, "exit_code", 2))
    return rc if isinstance(rc, int) else 0

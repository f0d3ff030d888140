"""Names from the data, made safe to print on a terminal.

A file or folder name may hold any byte but ``/`` and NUL: an ESC/OSC sequence in a name
can retitle or repaint the terminal, and a newline can forge a whole ``kmedtl:`` line.
:func:`printable` shows every character Python does not call printable (C0/C1 controls,
DEL, line and paragraph separators, bidirectional overrides and other format characters)
as the escape ``repr`` would use (``\\x1b``, ``\\n``, ``\\u202e``); a backslash stays a
backslash, so a name without such characters prints exactly as before.

    >>> printable("scan\\x1b]0;pwned\\x07.png")
    'scan\\\\x1b]0;pwned\\\\x07.png'
    >>> printable("a\\nkmedtl: ok")
    'a\\\\nkmedtl: ok'
    >>> print(printable("line 1\\nline\\x1b 2", keep_newlines=True))
    line 1
    line\\x1b 2
"""

from __future__ import annotations

import logging


def _escape(ch: str) -> str:
    return repr(ch)[1:-1] if ch not in "'\"" else ch


def printable(text, *, keep_newlines: bool = False) -> str:
    """``text`` with every non-printable character shown as its ``repr`` escape.

    ``keep_newlines=True`` keeps ``\\n`` (for messages whose lines are structure, each
    name in them already escaped); every other control character is escaped either way.
    """
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable() or (keep_newlines and ch == "\n"):
            out.append(ch)
        else:
            out.append(_escape(ch))
    return "".join(out)


class EscapingFormatter(logging.Formatter):
    """A log formatter whose messages go through :func:`printable` (a logged file name
    cannot reach the terminal raw); tracebacks are left as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API
        record.message = printable(record.message)
        return super().formatMessage(record)

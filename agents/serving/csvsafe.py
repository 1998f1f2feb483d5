"""CSV that a spreadsheet reads as data: every CSV export writes through :func:`writer`.

A spreadsheet (Excel, LibreOffice, Google Sheets) runs a cell that starts with
``=``, ``+``, ``-`` or ``@`` as a formula, and a leading tab or line break can
hide such a start.  kpimon's exports hold text that users control (a
``user_id`` such as ``=HYPERLINK("http://x","y")``), so, following OWASP's
advice on CSV injection:

* a cell that starts with one of :data:`FORMULA_START` gets a single quote
  ``'`` in front, which spreadsheets show as text and never evaluate;
* a plain decimal number (``-5.50``, ``12``: an optional minus, digits, an
  optional fraction) is a number, not a formula, and is written as is, so
  negative amounts stay numbers;
* every cell is wrapped in double quotes (inner quotes doubled), so that a
  spreadsheet that splits on ``;`` (a common list separator) cannot cut a cell
  into pieces whose second part starts with ``=``.

The quote prefix changes the text: a program that reads the CSV sees
``'=HYPERLINK(...)`` for that user_id; the JSON formats are unchanged.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import Any, TextIO

__all__ = ["FORMULA_START", "Writer", "cell", "writer"]

FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
"""Leading characters that make a spreadsheet evaluate a cell (or can hide one that does)."""

_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def cell(value: Any) -> str:
    """One cell's text: ``None`` is empty; a formula-like start is neutralised with ``'``."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if text.startswith(FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


class Writer:
    """``csv.writer`` with every cell passed through :func:`cell` and quoted."""

    def __init__(self, out: TextIO, lineterminator: str = "\r\n") -> None:
        self._w = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator=lineterminator)

    def writerow(self, row: Iterable[Any]) -> None:
        self._w.writerow([cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(out: TextIO, lineterminator: str = "\r\n") -> Writer:
    """A :class:`Writer` on ``out`` (a text stream, e.g. ``io.StringIO``)."""
    return Writer(out, lineterminator)

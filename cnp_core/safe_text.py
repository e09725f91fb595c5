"""Untrusted strings (attribute names and values, layer names, anything from a dataset or
a request) made safe for the report formats that carry them: CSV, Markdown, XML and the
terminal. One function per job; the writers call them on every such string."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# Control, format (bidi overrides, zero-width), surrogate and line/paragraph separator
# characters: they drive terminals, reorder text or make XML 1.0 ill-formed.
_HIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_NONCHARACTERS = "\ufffe\uffff"  # also forbidden in XML 1.0

# Spreadsheets run a cell that starts with one of these as a formula (OWASP CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

_MARKDOWN = re.compile(r"([\\`*_\[\]<>])")  # '|' is the table's own job (it splits cells)
_BACKTICKS = re.compile(r"`+")


def visible(value: Any) -> str:
    """``value`` as text with every hidden character written as its Python escape
    (``\\x1b``, ``\\n``, ``\\u202e``): it cannot move a terminal's cursor, colour it, forge
    a line, or break an XML document."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in _HIDDEN or char in _NONCHARACTERS
        else char
        for char in str(value)
    )


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows rather than runs: a string that starts like a formula
    gets a leading ``'``. Numbers, and strings that are plain numbers (``-0.5``), pass."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def md_text(value: Any) -> str:
    """``value`` as literal Markdown text: no emphasis, code, link, image or HTML."""
    return _MARKDOWN.sub(r"\\\1", visible(value))


def md_code(value: Any) -> str:
    """``value`` as a Markdown code span, fenced by more backticks than it holds."""
    text = visible(value)
    fence = "`" * (1 + max((len(run) for run in _BACKTICKS.findall(text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"

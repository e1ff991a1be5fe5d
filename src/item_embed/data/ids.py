"""Product ids: one rule, shared by every layer (catalog, embedding files, index, service).

An id is kept exactly as the catalog spells it, or the row is refused with a reason; it is never
rewritten. Specifically:

- Text is kept as it is, inner spaces included. Text with a control character (newline, tab, NUL
  ... or a Unicode line/paragraph separator) or with leading/trailing whitespace is refused: such
  ids break the CSV, JSONL and terminal outputs downstream, and padding is almost always an
  export accident. Blank text is a missing id.
- Integers (int64/uint64 Parquet columns, JSON numbers of any size) are written in decimal, exactly:
  the readers never pass integer columns through float64, so nulls do not change them.
- A float (a Parquet double column, a JSON ``3.0``) is accepted only when it is a whole number
  within +-2**53, where the float is exact, as that integer (``3.0`` -> ``"3"``); any other float is
  refused, since its text is not the catalog's (store such ids as text or integers).
- Bytes must be UTF-8 text. None, NaN and pandas' missing values are a missing id.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

MAX_EXACT_FLOAT = 2**53
# Unicode's control characters (category Cc: C0, DEL, C1) and its line and paragraph separators.
REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class IdError(ValueError):
    """An id cell that is refused; ``shown`` is the id as text where it can be shown (else None)."""

    def __init__(self, reason: str, shown: str | None = None) -> None:
        super().__init__(reason)
        self.shown = shown


def is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def product_id(value: Any) -> str | None:
    """The id of a catalog or embedding-file cell as exact text; None when missing or blank.

    Raises :class:`IdError` (with the reason for the row report) when the id is refused.
    """
    if is_missing(value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise IdError("id is not valid UTF-8") from None
    if isinstance(value, (bool, np.bool_)):
        raise IdError(f"id is a boolean ({bool(value)}): ids must be text or integers", str(bool(value)))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not number.is_integer():
            raise IdError(f"id is a fractional number ({number!r}): ids must be text or integers", repr(number))
        if abs(number) > MAX_EXACT_FLOAT:
            raise IdError(f"id is a float beyond 2**53 ({number!r}), so its digits are not exact: "
                          "store ids as text or integers", repr(number))
        return str(int(number))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: a CSV with bytes that are not UTF-8
        raise IdError("id is not valid UTF-8") from None
    if not text.strip():
        return None
    bad = REFUSED.search(text)
    if bad is not None:
        raise IdError(f"id contains a control character (U+{ord(bad.group()):04X})", text)
    if text != text.strip():
        raise IdError("id has leading or trailing whitespace", text)
    return text

"""Metadata filters: one small, safe expression language for every index backend.

    category == "bag"                        price < 10 and colour in ["red", "blue"]
    not (section == "Kids")                  1 <= price <= 5
    has_image == true                        colour is not None   (or: is not null)

The text is parsed with Python's ``ast`` (``mode="eval"``) and only this is accepted: comparisons
(``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, chained as in Python), ``in`` / ``not in`` a list
of literals, ``is None`` / ``is not None``, ``and`` / ``or`` / ``not``, parentheses, string,
number and boolean literals (``true``/``false`` too), and metadata column names. Nothing is ever
evaluated by Python: the tree is checked node by node and rebuilt as ``Filter``.

Missing values (null, NaN) never pass a comparison or ``in``: ``price < 10`` and ``price >= 10``
both leave out a product without a price, and so does ``not (price < 10)`` (SQL's rule). ``not``
is pushed down to the comparisons when parsing, so that rule holds however a backend treats nulls.

``Filter.mask(frame)`` evaluates the filter exactly over a metadata frame (FAISS);
``Filter.to_milvus(fields)`` writes the same predicate as a Milvus boolean expression.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import pandas as pd

MAX_FILTER_CHARS = 10_000
MAX_LIST_ITEMS = 10_000
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

# What a column holds, as far as filters care: the literals it can be compared with.
STRING, INT, FLOAT, BOOL, OTHER = "string", "int", "float", "bool", "other"
_NUMERIC = (INT, FLOAT)
_ANY = "any"  # a column known by name only: any literal goes


class FilterError(ValueError):
    """A filter that cannot be used: bad syntax, something not allowed, an unknown column, a type clash."""


Literal = Union[str, int, float, bool]

_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


# --------------------------------------------------------------------------------------------
# The tree: comparisons at the leaves, and / or above them (no `not`: it is pushed into the leaves)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    column: str
    op: str  # == != < <= > >=
    value: Literal


@dataclass(frozen=True)
class IsIn:
    column: str
    values: tuple
    negated: bool = False  # not in


@dataclass(frozen=True)
class IsNull:
    column: str
    negated: bool = False  # is not None


@dataclass(frozen=True)
class And:
    items: tuple


@dataclass(frozen=True)
class Or:
    items: tuple


Node = Union[Compare, IsIn, IsNull, And, Or]


def _and(items) -> Node:
    flat = tuple(j for i in items for j in (i.items if isinstance(i, And) else (i,)))
    return flat[0] if len(flat) == 1 else And(flat)


def _or(items) -> Node:
    flat = tuple(j for i in items for j in (i.items if isinstance(i, Or) else (i,)))
    return flat[0] if len(flat) == 1 else Or(flat)


def _negate(node: Node) -> Node:
    """``not node`` in negation normal form (De Morgan; a comparison's negation is its opposite, and
    still fails on a missing value)."""
    if isinstance(node, Compare):
        return Compare(node.column, _NEGATE[node.op], node.value)
    if isinstance(node, IsIn):
        return IsIn(node.column, node.values, not node.negated)
    if isinstance(node, IsNull):
        return IsNull(node.column, not node.negated)
    if isinstance(node, And):
        return _or(_negate(i) for i in node.items)
    return _and(_negate(i) for i in node.items)


# --------------------------------------------------------------------------------------------
# Column kinds
# --------------------------------------------------------------------------------------------


def column_kind(values: pd.Series) -> str:
    """STRING, INT, FLOAT, BOOL or OTHER for a metadata column (what its non-missing values are)."""
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return BOOL
    if pd.api.types.is_integer_dtype(dtype):
        return INT
    if pd.api.types.is_float_dtype(dtype):
        return FLOAT
    if pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype) or dtype == object:
        present = values.dropna()
        if isinstance(dtype, pd.CategoricalDtype):
            present = present.astype(object)
        kinds = {type(v) for v in present.tolist()}
        if not kinds or kinds <= {str}:
            return STRING
        if kinds <= {bool, np.bool_}:
            return BOOL
        if kinds <= {int, np.int64, np.int32, np.int16, np.int8}:
            return INT
        if kinds <= {int, float, np.int64, np.float64, np.float32}:
            return FLOAT
    return OTHER


def column_kinds(frame: pd.DataFrame) -> dict[str, str]:
    return {str(c): column_kind(frame[c]) for c in frame.columns}


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _bad(text: str, node: ast.AST | None, what: str) -> FilterError:
    where = f", character {node.col_offset + 1}" if node is not None and hasattr(node, "col_offset") else ""
    return FilterError(f"filter {text!r}{where}: {what}")


class _Parser:
    def __init__(self, text: str, kinds: Mapping[str, str]) -> None:
        self.text, self.kinds = text, kinds

    def columns_hint(self) -> str:
        usable = [c for c, k in self.kinds.items() if k != OTHER and c.isidentifier()]
        return ", ".join(usable) if usable else "(none)"

    def node(self, n: ast.AST) -> Node:
        if isinstance(n, ast.BoolOp):
            items = [self.node(v) for v in n.values]
            return _and(items) if isinstance(n.op, ast.And) else _or(items)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return _negate(self.node(n.operand))
        if isinstance(n, ast.Compare):
            parts = []
            left = n.left
            for op, right in zip(n.ops, n.comparators):
                parts.append(self.compare(left, op, right))
                left = right
            return _and(parts)
        if isinstance(n, ast.Name):
            raise _bad(self.text, n, f"a bare column ({n.id}) is not a condition: compare it, e.g. {n.id} == true")
        raise _bad(self.text, n, f"{type(n).__name__} is not allowed (only comparisons, in / not in, "
                                 "is None, and / or / not, literals and column names)")

    def column(self, n: ast.AST) -> str | None:
        if isinstance(n, ast.Name):
            if n.id not in self.kinds:
                if n.id in ("true", "false", "True", "False", "None", "null"):
                    return None
                raise FilterError(f"filter {self.text!r}: unknown column {n.id!r}; the columns are: "
                                  f"{self.columns_hint()}")
            if self.kinds[n.id] == OTHER:
                raise FilterError(f"filter {self.text!r}: column {n.id!r} holds values that cannot be compared "
                                  f"(lists, bytes, mixed types); the columns are: {self.columns_hint()}")
            return n.id
        return None

    def literal(self, n: ast.AST, what: str = "a value") -> Literal | None:
        """A literal's value; None for the None constant (only `is None` takes it)."""
        if isinstance(n, ast.Constant):
            v = n.value
            if v is None or isinstance(v, (str, bool)):
                return v
            if isinstance(v, int):
                return self.checked_int(v, n)
            if isinstance(v, float):
                return self.checked_float(v, n)
            raise _bad(self.text, n, f"{type(v).__name__} literals are not allowed")
        if isinstance(n, ast.Name) and n.id in ("true", "false", "True", "False"):
            return n.id in ("true", "True")
        signed = isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd))
        if signed and isinstance(n.operand, ast.Constant) and isinstance(n.operand.value, (int, float)) \
                and not isinstance(n.operand.value, bool):
            v = -n.operand.value if isinstance(n.op, ast.USub) else n.operand.value
            return self.checked_int(v, n) if isinstance(v, int) else self.checked_float(v, n)
        raise _bad(self.text, n, f"expected {what} (a string, number or true/false literal)")

    def checked_int(self, v: int, n: ast.AST) -> int:
        if not INT64_MIN <= v <= INT64_MAX:
            raise _bad(self.text, n, f"integer {v} is out of the 64-bit range")
        return v

    def checked_float(self, v: float, n: ast.AST) -> float:
        if not math.isfinite(v):
            raise _bad(self.text, n, "numbers must be finite")
        return v

    def typed(self, column: str, value: Literal, op: str, n: ast.AST) -> Literal:
        """``value`` checked against the column's kind (and made exact for whole-number columns)."""
        kind = self.kinds[column]
        if kind == _ANY:
            return value
        if kind == STRING and isinstance(value, str):
            return value
        if kind == BOOL and isinstance(value, bool):
            if op not in ("==", "!="):
                raise _bad(self.text, n, f"{column!r} is true/false: compare it with == or !=, not {op}")
            return value
        if kind in _NUMERIC and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        shown = {STRING: "text", INT: "whole numbers", FLOAT: "numbers", BOOL: "true/false"}[kind]
        raise _bad(self.text, n, f"column {column!r} holds {shown}, not {type(value).__name__} like {value!r}")

    def compare(self, left: ast.AST, op: ast.cmpop, right: ast.AST) -> Node:
        if isinstance(op, (ast.In, ast.NotIn)):
            column = self.column(left)
            if column is None:
                raise _bad(self.text, left, "`in` needs a column on its left")
            if not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                raise _bad(self.text, right, "`in` needs a list of literals on its right, e.g. [\"a\", \"b\"]")
            if not right.elts:
                raise _bad(self.text, right, "an empty list matches nothing: give at least one value")
            if len(right.elts) > MAX_LIST_ITEMS:
                raise _bad(self.text, right, f"more than {MAX_LIST_ITEMS} values in one list")
            values = []
            for e in right.elts:
                v = self.literal(e, "a list item")
                if v is None:
                    raise _bad(self.text, e, "None cannot be in a list: use `is None`")
                v = self.typed(column, v, "==", e)
                if self.kinds[column] == INT and isinstance(v, float):
                    if not v.is_integer():
                        raise _bad(self.text, e, f"column {column!r} holds whole numbers, never {v!r}")
                    v = int(v)
                values.append(v)
            return IsIn(column, tuple(dict.fromkeys(values)), isinstance(op, ast.NotIn))
        if isinstance(op, (ast.Is, ast.IsNot)):
            column = self.column(left)
            none = (isinstance(right, ast.Constant) and right.value is None) or \
                (isinstance(right, ast.Name) and right.id == "null" and "null" not in self.kinds)
            if column is None or not none:
                raise _bad(self.text, left, "`is` only takes the form: column is None / column is not None")
            return IsNull(column, isinstance(op, ast.IsNot))
        symbol = _OPS.get(type(op))
        if symbol is None:
            raise _bad(self.text, left, f"operator {type(op).__name__} is not allowed")
        lcol, rcol = self.column(left), self.column(right)
        if lcol is not None and rcol is not None:
            raise _bad(self.text, left, "compare a column with a literal, not with another column")
        if lcol is None and rcol is None:
            for side in (left, right):
                if not isinstance(side, (ast.Name, ast.Constant, ast.UnaryOp)):
                    raise _bad(self.text, side, f"{type(side).__name__} is not allowed: compare a column name "
                                                "with a literal")
            raise _bad(self.text, left, "a comparison needs a column name on one side")
        column, lit_node = (lcol, right) if lcol is not None else (rcol, left)
        if lcol is None:
            symbol = _FLIP[symbol]
        value = self.literal(lit_node)
        if value is None:
            raise _bad(self.text, lit_node, "compare with None using `is None` / `is not None`")
        value = self.typed(column, value, symbol, lit_node)
        if self.kinds[column] == INT and isinstance(value, float):
            # A whole-number column against a fraction: the same test with a whole number, so that
            # every backend compares integers with integers.
            if value.is_integer():
                value = int(value)
            elif symbol in ("<", "<="):
                symbol, value = "<", math.ceil(value)
            elif symbol in (">", ">="):
                symbol, value = ">", math.floor(value)
            else:
                raise _bad(self.text, lit_node, f"column {column!r} holds whole numbers: {symbol} {value!r} "
                                                "can never decide anything")
        return Compare(column, symbol, value)


@dataclass(frozen=True)
class Filter:
    """A parsed, checked filter over metadata columns (see the module docstring for the language)."""

    text: str
    tree: Node
    kinds: tuple  # (column, kind) pairs of the columns it was checked against

    @property
    def columns(self) -> set[str]:
        out: set[str] = set()

        def walk(n: Node) -> None:
            if isinstance(n, (And, Or)):
                for i in n.items:
                    walk(i)
            else:
                out.add(n.column)

        walk(self.tree)
        return out

    def __str__(self) -> str:
        return self.text

    # ------------------------------------------------------------------ exact evaluation (pandas)

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        """(len(frame),) bool: the rows that pass. Missing values never pass a comparison."""
        missing = sorted(c for c in self.columns if c not in frame.columns)
        if missing:
            raise FilterError(f"filter {self.text!r}: no column {', '.join(map(repr, missing))} in the metadata; "
                              f"the columns are: {', '.join(map(str, frame.columns)) or '(none)'}")
        return _mask(self.tree, frame)

    # ------------------------------------------------------------------ Milvus expression

    def to_milvus(self, fields: Mapping[str, str] | None = None) -> str:
        """The same predicate in Milvus's expression language; ``fields`` maps column -> field name
        where they differ. ``!=`` and ``not in`` are guarded with ``is not null``, so a missing value
        fails them whatever the server's null logic."""
        fields = dict(fields or {})
        return _milvus(self.tree, lambda c: fields.get(c, c))


def parse_filter(text: str, columns: Mapping[str, str] | Sequence[str] | pd.DataFrame) -> Filter:
    """Parse and check ``text`` against ``columns``: a metadata frame, a mapping column -> kind
    (STRING, INT, FLOAT, BOOL, OTHER), or plain names (then every literal type is accepted)."""
    if isinstance(columns, pd.DataFrame):
        kinds = column_kinds(columns)
    elif isinstance(columns, Mapping):
        kinds = {str(c): k for c, k in columns.items()}
    else:
        kinds = {str(c): None for c in columns}
    if not isinstance(text, str) or not text.strip():
        raise FilterError("the filter is empty: give a condition such as category == \"bag\"")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"the filter is longer than {MAX_FILTER_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise FilterError(f"filter {text!r} is not valid syntax ({e.msg}, at column {e.offset}): write e.g. "
                          "category == \"bag\" and price < 10") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise FilterError(f"filter {text!r} cannot be parsed ({type(e).__name__})") from None
    parser = _Parser(text, {c: (k if k is not None else _ANY) for c, k in kinds.items()})
    try:
        node = parser.node(tree.body)
    except RecursionError:
        raise FilterError(f"filter {text!r} is nested too deeply") from None
    return Filter(text=text, tree=node, kinds=tuple(sorted(kinds.items(), key=lambda kv: kv[0])))


# --------------------------------------------------------------------------------------------
# Evaluation over a frame
# --------------------------------------------------------------------------------------------


def _present(col: pd.Series) -> np.ndarray:
    return ~col.isna().to_numpy(dtype=bool)


def _values(col: pd.Series, value: Literal) -> np.ndarray:
    """The column as a numpy array fit for comparing with ``value`` exactly: int64 or float64 for
    numbers (a float32 column is compared as the doubles it holds, as Milvus stores it), bool for
    true/false columns, objects otherwise."""
    dtype = col.dtype
    if isinstance(value, bool):
        if pd.api.types.is_bool_dtype(dtype):
            return col.to_numpy(dtype=bool, na_value=False)
    elif isinstance(value, (int, float)) and pd.api.types.is_numeric_dtype(dtype) \
            and not pd.api.types.is_bool_dtype(dtype):
        if pd.api.types.is_integer_dtype(dtype) and isinstance(value, int):
            return col.to_numpy(dtype=np.int64, na_value=0)
        return col.to_numpy(dtype=np.float64, na_value=np.nan)
    return col.to_numpy(dtype=object, na_value=None)


def _same_type(cell, value: Literal) -> bool:
    """Whether a cell and a literal are comparable as a backend sees them: text with text, true/false
    with true/false, numbers with numbers."""
    if isinstance(value, str) or isinstance(cell, str):
        return isinstance(value, str) and isinstance(cell, str)
    if isinstance(value, bool) or isinstance(cell, (bool, np.bool_)):
        return isinstance(value, bool) and isinstance(cell, (bool, np.bool_))
    return isinstance(cell, (int, float, np.integer, np.floating))


def _where_present(values: np.ndarray, present: np.ndarray, test) -> np.ndarray:
    """``test`` (the present cells -> one bool each) where ``present``; False elsewhere."""
    out = np.zeros(len(values), dtype=bool)
    idx = np.flatnonzero(present)
    if len(idx):
        out[idx] = test(values[idx])
    return out


def _compare_cells(values: np.ndarray, present: np.ndarray, op: str, value: Literal) -> np.ndarray:
    fn = _PY_OPS[op]

    def compare(v: np.ndarray) -> np.ndarray:
        if v.dtype != object:
            return fn(v, value)

        # Objects: a cell of another type than the literal never passes (not even !=).
        def test(cell) -> bool:
            try:
                return _same_type(cell, value) and bool(fn(cell, value))
            except TypeError:
                return False

        return np.fromiter((test(c) for c in v), dtype=bool, count=len(v))

    return _where_present(values, present, compare)


def _is_in(values: np.ndarray, present: np.ndarray, items: tuple) -> np.ndarray:
    keys = {(type(i) is str, isinstance(i, bool), i) for i in items}

    def member(v: np.ndarray) -> np.ndarray:
        if v.dtype != object:
            return np.isin(v, np.asarray(items, dtype=v.dtype if v.dtype == bool else None))
        return np.fromiter(((isinstance(c, str), isinstance(c, (bool, np.bool_)), c) in keys for c in v),
                           dtype=bool, count=len(v))

    return _where_present(values, present, member)


_PY_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
           "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _mask(node: Node, frame: pd.DataFrame) -> np.ndarray:
    if isinstance(node, And):
        out = np.ones(len(frame), dtype=bool)
        for i in node.items:
            out &= _mask(i, frame)
        return out
    if isinstance(node, Or):
        out = np.zeros(len(frame), dtype=bool)
        for i in node.items:
            out |= _mask(i, frame)
        return out
    col = frame[node.column]
    present = _present(col)
    if isinstance(node, IsNull):
        return present if node.negated else ~present
    if isinstance(node, Compare):
        return _compare_cells(_values(col, node.value), present, node.op, node.value)
    hit = _is_in(_values(col, node.values[0]), present, node.values)
    return present & ~hit if node.negated else hit


# --------------------------------------------------------------------------------------------
# Milvus expressions
# --------------------------------------------------------------------------------------------

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def milvus_literal(value: Literal) -> str:
    """A literal in Milvus syntax: double-quoted strings with C escapes, true/false, plain numbers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest exact round trip: 0.1, 1e-05, 3.0
    text = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
            .replace("\t", "\\t"))
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):  # no escape Milvus reads for these
        raise FilterError(f"filter text {value!r} holds a control character Milvus cannot take")
    return f'"{text}"'


def _milvus(node: Node, field) -> str:
    if isinstance(node, (And, Or)):
        joiner = " and " if isinstance(node, And) else " or "
        return "(" + joiner.join(_milvus(i, field) for i in node.items) + ")"
    name = field(node.column)
    if not _FIELD.match(name):
        raise FilterError(f"column {node.column!r} has no Milvus field name that a filter can use")
    if isinstance(node, IsNull):
        return f"({name} is not null)" if node.negated else f"({name} is null)"
    if isinstance(node, Compare):
        cmp = f"{name} {node.op} {milvus_literal(node.value)}"
        return f"({name} is not null and {cmp})" if node.op == "!=" else f"({cmp})"
    items = "[" + ", ".join(milvus_literal(v) for v in node.values) + "]"
    if node.negated:
        return f"({name} is not null and {name} not in {items})"
    return f"({name} in {items})"

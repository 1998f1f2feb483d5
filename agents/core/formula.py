"""A tiny, safe arithmetic expression language for KPI formulas.  Pure.

A formula such as ``revenue / active_users`` or ``churned / prev.population.active``
is parsed with :mod:`ast` and checked against a whitelist; nothing is ever
passed to ``eval``.  Allowed:

* numbers (``100``, ``0.5``, ``1e3``), read exactly as written (``0.1`` is 1/10);
* names, optionally dotted (``population.active``, ``new_users_by_channel.paid_search``);
  the prefix ``prev.`` names the previous period's value (``prev.population.active``);
* ``+``, ``-``, ``*``, ``/``, unary ``-``/``+`` and parentheses, with the usual precedence.

Everything else -- calls, subscripts, attribute access on expressions or on
names starting with ``_``, ``**``, ``//``, ``%``, comparisons, booleans,
strings, lambdas ... -- is refused by :func:`parse_formula` with a
:class:`FormulaError` naming the construct.

Arithmetic is done on :class:`fractions.Fraction`, so it is exact.  A division
by zero gives ``None`` ("no value"), and ``None`` propagates through every
operator.  Which names exist is not this module's business: the caller checks
:attr:`Formula.names` against its catalogue (``agents.core.kpi_metrics.metric_name_problem``)
when the spec is loaded.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any

from kpimon.errors import EXIT_CONFIG, KpimonError

__all__ = ["PREV", "Formula", "FormulaError", "parse_formula", "to_fraction"]

PREV = "prev."
MAX_LENGTH = 500
MAX_NODES = 200

Resolver = Callable[[str], "Fraction | None"]


class FormulaError(KpimonError, ValueError):
    """A formula that is not valid in the KPI expression language (a configuration error: exit status 2)."""

    exit_code = EXIT_CONFIG


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_REFUSED_OPS = {ast.Pow: "**", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<",
                ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&"}
_REFUSED_NODES = {
    ast.Call: "function calls are not allowed",
    ast.Subscript: "subscripts are not allowed",
    ast.Compare: "comparisons are not allowed",
    ast.BoolOp: "boolean operators are not allowed",
    ast.IfExp: "conditional expressions are not allowed",
    ast.Lambda: "lambdas are not allowed",
    ast.NamedExpr: "assignments are not allowed",
    ast.Starred: "starred expressions are not allowed",
    ast.JoinedStr: "strings are not allowed",
    ast.List: "lists are not allowed",
    ast.Tuple: "tuples are not allowed",
    ast.Set: "sets are not allowed",
    ast.Dict: "dicts are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}


def to_fraction(value: Any, what: str = "value") -> Fraction:
    """Exact conversion of an int, ``Decimal``, ``Fraction`` or decimal string.

    Floats are refused (they are not exact); bools are refused (they are not numbers).
    """
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected a number, got a bool")
    if isinstance(value, Fraction):
        return value
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{what}: {value} is not finite")
        return Fraction(value)
    if isinstance(value, str):
        try:
            return Fraction(Decimal(value.strip()))
        except (ArithmeticError, ValueError):
            raise ValueError(f"{what}: {value!r} is not a decimal number") from None
    if isinstance(value, float):
        raise TypeError(f"{what}: {value!r} is a float; pass an int or an exact decimal string")
    raise TypeError(f"{what}: expected a number, got {type(value).__name__}")


# --------------------------------------------------------------------------- compiled form
# A compiled node is a small tuple tree:
#   ("num", Fraction) | ("name", "dotted.name") | ("neg", node) | (op, left, right) with op in + - * /


@dataclass(frozen=True)
class Formula:
    """A parsed formula.  ``names`` lists the dotted names it reads, in order of first use."""

    text: str
    names: tuple[str, ...]
    _tree: tuple = field(repr=False, compare=False)

    @property
    def uses_prev(self) -> bool:
        return any(n.startswith(PREV) for n in self.names)

    def evaluate(self, resolve: Resolver) -> Fraction | None:
        """Value of the formula; ``resolve(name)`` gives a name's value (or ``None``)."""
        return _eval(self._tree, resolve)

    def rename(self, mapping: Callable[[str], str]) -> Formula:
        """The same formula reading ``mapping(name)`` instead of each name."""
        tree = _rename(self._tree, mapping)
        return Formula(self.text, tuple(dict.fromkeys(mapping(n) for n in self.names)), tree)

    def is_linear(self, additive: Callable[[str], bool], constant: Callable[[str], bool] = lambda name: False) -> bool:
        """True if the formula is a homogeneous linear combination of names for which
        ``additive(name)`` holds, with coefficients made of numbers and names for which
        ``constant(name)`` holds (``revenue - refunds``, ``2 * orders``,
        ``churned / prev.population.active``): such a formula grows over a period like
        its additive inputs do, so it can be projected linearly."""
        return _kind(self._tree, additive, constant) == "lin"


@lru_cache(maxsize=1024)
def parse_formula(text: str) -> Formula:
    """Parse and whitelist-check ``text``; raise :class:`FormulaError` with the reason."""
    if not isinstance(text, str):
        raise FormulaError(f"expected a string, got {type(text).__name__}")
    source = text.strip()
    if not source:
        raise FormulaError("is empty")
    if len(source) > MAX_LENGTH:
        raise FormulaError(f"is longer than {MAX_LENGTH} characters")
    if "\n" in source or "\r" in source:
        raise FormulaError("must be a single line")
    try:
        module = ast.parse(source, mode="eval")
    except SyntaxError as err:
        col = f" at column {err.offset}" if err.offset else ""
        raise FormulaError(f"invalid syntax{col}: {source!r}") from None
    except (ValueError, RecursionError, MemoryError):
        raise FormulaError(f"cannot be parsed: {source!r}") from None
    if sum(1 for _ in ast.walk(module)) > MAX_NODES:
        raise FormulaError(f"is too complex (more than {MAX_NODES} syntax nodes)")
    names: list[str] = []
    tree = _compile(module.body, source, names)
    return Formula(source, tuple(dict.fromkeys(names)), tree)


def _dotted(node: ast.AST) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise FormulaError("attribute access is not allowed (only dotted metric names like population.active)")
    parts.append(node.id)
    parts.reverse()
    for part in parts:
        if part.startswith("_"):
            raise FormulaError(f"attribute access is not allowed: {'.'.join(parts)!r}")
    return ".".join(parts)


def _compile(node: ast.AST, source: str, names: list[str]) -> tuple:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormulaError(f"only numbers are allowed as constants, got {value!r}")
        literal = ast.get_source_segment(source, node) or repr(value)
        try:
            return ("num", Fraction(Decimal(literal.replace("_", ""))))
        except (ArithmeticError, ValueError):  # e.g. 0x10: still an exact int
            if isinstance(value, int):
                return ("num", Fraction(value))
            raise FormulaError(f"cannot read the number {literal!r}") from None
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = _dotted(node)
        names.append(name)
        return ("name", name)
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            sym = _REFUSED_OPS.get(type(node.op), type(node.op).__name__)
            raise FormulaError(f"operator {sym} is not allowed (only + - * /)")
        return (op, _compile(node.left, source, names), _compile(node.right, source, names))
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return ("neg", _compile(node.operand, source, names))
        if isinstance(node.op, ast.UAdd):
            return _compile(node.operand, source, names)
        raise FormulaError(f"unary operator {type(node.op).__name__} is not allowed (only - and +)")
    for kind, message in _REFUSED_NODES.items():
        if isinstance(node, kind):
            raise FormulaError(message)
    raise FormulaError(f"{type(node).__name__} is not allowed (only numbers, metric names, + - * / and parentheses)")


def _eval(node: tuple, resolve: Resolver) -> Fraction | None:
    tag = node[0]
    if tag == "num":
        return node[1]
    if tag == "name":
        return resolve(node[1])
    if tag == "neg":
        v = _eval(node[1], resolve)
        return None if v is None else -v
    a = _eval(node[1], resolve)
    b = _eval(node[2], resolve)
    if a is None or b is None:
        return None
    if tag == "+":
        return a + b
    if tag == "-":
        return a - b
    if tag == "*":
        return a * b
    if b == 0:  # "/"
        return None
    return a / b


def _rename(node: tuple, mapping: Callable[[str], str]) -> tuple:
    tag = node[0]
    if tag == "num":
        return node
    if tag == "name":
        return ("name", mapping(node[1]))
    return (tag, *(_rename(child, mapping) for child in node[1:]))


def _kind(node: tuple, additive: Callable[[str], bool], constant: Callable[[str], bool]) -> str:
    """'const', 'lin' (homogeneous linear in additive names) or 'other'."""
    tag = node[0]
    if tag == "num":
        return "const"
    if tag == "name":
        if constant(node[1]):
            return "const"
        return "lin" if additive(node[1]) else "other"
    if tag == "neg":
        return _kind(node[1], additive, constant)
    a, b = _kind(node[1], additive, constant), _kind(node[2], additive, constant)
    if "other" in (a, b):
        return "other"
    if tag in ("+", "-"):
        return a if a == b else "other"
    if tag == "*":
        if a == "const" or b == "const":
            return "lin" if "lin" in (a, b) else "const"
        return "other"
    # "/": only division by a constant keeps linearity
    return a if b == "const" else "other"


def names_of(formulas: Iterable[Formula]) -> tuple[str, ...]:
    """All names read by ``formulas``, in order of first use."""
    return tuple(dict.fromkeys(n for f in formulas for n in f.names))

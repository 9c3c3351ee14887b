"""Arithmetic for the ``Calculator`` tool: a small grammar parsed by recursive descent and
computed exactly with fractions. Nothing here calls ``eval`` or ``compile``: a model's
"expression" is data, and the only things it can do are the operators below.

Grammar (``^`` and ``**`` are the same right-associative power; ``×`` and ``÷`` are ``*``
and ``/``; ``//`` is floor division)::

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/" | "//" | "%") unary)*
    unary  := ("+" | "-") unary | power
    power  := atom (("^" | "**") unary)?
    atom   := NUMBER | "(" expr ")"
    NUMBER := digits ["." digits] [("e" | "E") ["+" | "-"] digits]

Bounds, so that no expression can take a worker's CPU or memory: at most
:data:`MAX_CHARS` characters and :data:`MAX_DEPTH` nested parentheses or signs, number
literals of at most :data:`MAX_DIGITS` digits and exponents of at most ±100, and every
intermediate result below 10^100 in size (numerator and denominator) — a power is refused
*before* it is computed when its result would be larger. A fractional power (``2 ^ 0.5``)
is computed in floating point.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_CHARS = 500
MAX_DEPTH = 40
MAX_DIGITS = 40
MAX_LOG10 = 100  # results (numerators and denominators) stay below 10**100
_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
                    r"|(?P<op>\*\*|//|[-+*/%^()×÷]))")
_SYNONYMS = {"×": "*", "÷": "/", "**": "^"}


class CalculatorError(ValueError):
    """The expression cannot be computed; the message says why (and where)."""


def evaluate(expression: str) -> str:
    """The value of ``expression`` as text: an integer, or a decimal with up to 15
    significant digits (``"1/3"`` → ``"0.333333333333333"``)."""
    value = _Parser(expression).parse()
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), ".15g")


class _Parser:
    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise CalculatorError("the expression is empty")
        if len(text) > MAX_CHARS:
            raise CalculatorError(f"the expression is {len(text)} characters; at most {MAX_CHARS}")
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0

    def parse(self) -> Fraction:
        value = self._expr()
        if self.pos < len(self.tokens):
            _kind, text, at = self.tokens[self.pos]
            raise CalculatorError(f"unexpected '{text}' at position {at + 1}")
        return value

    # -- grammar ---------------------------------------------------------------------------

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self._next()
            right = self._term()
            value = _bounded(value + right if op == "+" else value - right)
        return value

    def _term(self) -> Fraction:
        value = self._unary()
        while self._peek() in ("*", "/", "//", "%"):
            op = self._next()
            right = self._unary()
            if op == "*":
                value = _bounded(value * right)
                continue
            if right == 0:
                raise CalculatorError("division by zero")
            value = _bounded(value / right if op == "/" else
                             Fraction(value // right) if op == "//" else value % right)
        return value

    def _unary(self) -> Fraction:
        if self._peek() in ("+", "-"):
            op = self._next()
            with self._nested():
                value = self._unary()
            return -value if op == "-" else value
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() == "^":
            self._next()
            with self._nested():
                exponent = self._unary()
            return _power(base, exponent)
        return base

    def _atom(self) -> Fraction:
        if self.pos >= len(self.tokens):
            raise CalculatorError("the expression ends where a number was expected")
        kind, text, at = self.tokens[self.pos]
        self.pos += 1
        if kind == "num":
            return _number(text, at)
        if text == "(":
            with self._nested():
                value = self._expr()
            if self._peek() != ")":
                raise CalculatorError(f"the '(' at position {at + 1} is not closed")
            self.pos += 1
            return value
        raise CalculatorError(f"unexpected '{text}' at position {at + 1}; expected a number")

    # -- helpers ---------------------------------------------------------------------------

    def _peek(self) -> str | None:
        if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "op":
            return self.tokens[self.pos][1]
        return None

    def _next(self) -> str:
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def _nested(self) -> _Depth:
        return _Depth(self)


class _Depth:
    """Counts nesting (parentheses, signs, exponents) so recursion stays shallow."""

    def __init__(self, parser: _Parser) -> None:
        self.parser = parser

    def __enter__(self) -> None:
        self.parser.depth += 1
        if self.parser.depth > MAX_DEPTH:
            raise CalculatorError(f"the expression nests more than {MAX_DEPTH} levels deep")

    def __exit__(self, *exc: object) -> None:
        self.parser.depth -= 1


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            at = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise CalculatorError(f"unexpected character {text[at]!r} at position {at + 1}; "
                                  "only numbers, + - * / // % ^ and parentheses are allowed")
        kind = "num" if match.group("num") else "op"
        value = match.group(kind)
        tokens.append((kind, _SYNONYMS.get(value, value), match.start(kind)))
        pos = match.end()
    return tokens


def _number(text: str, at: int) -> Fraction:
    mantissa, _, exponent = text.lower().partition("e")
    if sum(c.isdigit() for c in mantissa) > MAX_DIGITS:
        raise CalculatorError(f"the number at position {at + 1} has more than {MAX_DIGITS} digits")
    if exponent and abs(int(exponent)) > MAX_LOG10:
        raise CalculatorError(f"the exponent of the number at position {at + 1} is beyond "
                              f"±{MAX_LOG10}")
    return _bounded(Fraction(mantissa) * Fraction(10) ** int(exponent or 0))


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:  # a root: floating point, real results only
        if base < 0:
            raise CalculatorError("a fractional power of a negative number has no real value")
        try:
            result = float(base) ** float(exponent)
        except (OverflowError, ZeroDivisionError):
            raise CalculatorError("the result is too large") from None
        if not math.isfinite(result):
            raise CalculatorError("the result is too large")
        return _bounded(Fraction(result))
    n = exponent.numerator
    if base == 0 and n < 0:
        raise CalculatorError("division by zero (0 to a negative power)")
    if base in (0, 1) or n == 0:
        return Fraction(1) if n == 0 else base
    if base == -1:
        return Fraction(-1 if n % 2 else 1)
    size = abs(n) * max(_log10(abs(base.numerator)), _log10(base.denominator))
    if size > MAX_LOG10:
        raise CalculatorError(f"the result would have about {size:.0f} digits; at most {MAX_LOG10}")
    return _bounded(base ** n)


def _log10(value: int) -> float:
    return math.log10(value) if value > 0 else 0.0


def _bounded(value: Fraction) -> Fraction:
    limit = 10 ** MAX_LOG10
    if abs(value.numerator) >= limit or value.denominator >= limit:
        raise CalculatorError(f"an intermediate result is beyond 10^{MAX_LOG10}")
    return value

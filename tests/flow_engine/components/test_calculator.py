"""The Calculator's arithmetic: a grammar, exact, bounded — and never Python's eval."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flow_engine.components.calculator import MAX_CHARS, MAX_DEPTH, CalculatorError, evaluate


@pytest.mark.parametrize(("expression", "value"), [
    ("12*7", "84"), ("(12 + 30) * 2", "84"), ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"),
    ("7 - 2 - 1", "4"), ("2 ^ 3 ^ 2", "512"), ("2 ** 10", "1024"), ("-2 ^ 2", "-4"),
    ("(-2) ^ 2", "4"), ("2 ^ -2", "0.25"), ("-(-3)", "3"), ("+5", "5"),
    ("10 / 4", "2.5"), ("1 / 3", "0.333333333333333"), ("10 // 3", "3"), ("-7 // 2", "-4"),
    ("10 % 4", "2"), ("0.1 + 0.2", "0.3"), ("1e3 + 1", "1001"), ("2.5e-1", "0.25"),
    ("7 × 6 ÷ 2", "21"), ("9 ^ 0.5", "3"), ("2 ^ 0.5", "1.4142135623731"), (" 42 ", "42"),
    ("1 ^ 1000000000", "1"), ("(-1) ^ 1000000001", "-1"), ("0 ^ 0", "1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_values(expression: str, value: str) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(("expression", "reason"), [
    pytest.param("", "empty", id="empty"),
    pytest.param("1 +", "ends where a number was expected", id="dangling-operator"),
    pytest.param("(1 + 2", "not closed", id="unclosed"),
    pytest.param("1 + 2)", "unexpected ')'", id="extra-close"),
    pytest.param("1 / 0", "division by zero", id="divide-by-zero"),
    pytest.param("5 % 0", "division by zero", id="modulo-zero"),
    pytest.param("0 ^ -1", "division by zero", id="zero-negative-power"),
    pytest.param("(-8) ^ 0.5", "no real value", id="negative-root"),
    pytest.param("9 ^ 9 ^ 9", "digits", id="tower"),
    pytest.param("2 ^ 400", "digits", id="too-many-digits"),
    pytest.param("10 ^ 99 * 10 ^ 99", "beyond", id="product-too-large"),
    pytest.param("1e101", "exponent", id="literal-exponent"),
    pytest.param("1" * 41, "more than 40 digits", id="long-literal"),
    pytest.param("1 / 3 ^ 250", "digits", id="tiny-fraction"),
    pytest.param("abs(-1)", "unexpected character 'a'", id="function"),
    pytest.param("x + 1", "unexpected character 'x'", id="name"),
    pytest.param("1; 2", "unexpected character ';'", id="statement"),
    pytest.param("[1, 2]", "unexpected character '['", id="list"),
    pytest.param("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "nests", id="deep"),
    pytest.param("-" * (MAX_DEPTH + 1) + "1", "nests", id="deep-signs"),
    pytest.param("1+" * (MAX_CHARS // 2) + "1", "characters", id="too-long"),
])
def test_refusals_say_why(expression: str, reason: str) -> None:
    with pytest.raises(CalculatorError, match=re.escape(reason)):
        evaluate(expression)


@pytest.mark.parametrize("expression", [
    "__import__('pathlib').Path('{path}').touch()",
    "open('{path}', 'w').write('x')",
    "exec(\"open('{path}', 'w')\")",
    "(lambda: open('{path}', 'w'))()",
])
def test_code_is_never_run(tmp_path: Path, expression: str) -> None:
    target = tmp_path / "written-by-eval"

    with pytest.raises(CalculatorError, match="unexpected character"):
        evaluate(expression.format(path=target))

    assert not target.exists()


def test_a_refused_power_is_refused_before_it_is_computed() -> None:
    """9^9^9 has 369 million digits: computing it would take minutes and gigabytes; the
    size is estimated from logarithms first, so the refusal is immediate (no timing test:
    if it were computed, this test would not finish)."""
    with pytest.raises(CalculatorError, match="369693100 digits"):
        evaluate("9 ^ 9 ^ 9")

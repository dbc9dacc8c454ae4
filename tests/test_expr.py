"""The rule expression language of task specs: what it computes, what it refuses, and that it never runs code."""

from __future__ import annotations

import ast
import builtins

import pytest

from banklm.tasks.expr import ExprError, compile_expr

KINDS = {"逾期天数": "number", "余额": "number", "状态": "text", "涉诉": "yes/no", "申请金额(万元)": "number",
         "日期": "date", "dti": "number", "交易": "records"}
CONSTANTS = {"上限": 90, "差的状态": ["下滑", "停业"]}
CATEGORIES = {"状态": ["正常", "下滑", "停业"]}


def ev(src, **values):
    return compile_expr(src, KINDS, constants=CONSTANTS, categories=CATEGORIES)(values)


@pytest.mark.parametrize("src,values,want", [
    ("逾期天数 > 上限", {"逾期天数": 91}, True),
    ("逾期天数 > 上限", {"逾期天数": 90}, False),
    ("逾期天数 >= 90 and 状态 == '正常'", {"逾期天数": 90, "状态": "正常"}, True),
    ("逾期天数 >= 90 or 涉诉", {"逾期天数": 1, "涉诉": True}, True),
    ("not 涉诉", {"涉诉": False}, True),
    ("0 < 逾期天数 <= 上限", {"逾期天数": 5}, True),
    ("0 < 逾期天数 <= 上限", {"逾期天数": 0}, False),
    ("余额 / 逾期天数 > 2", {"余额": 10, "逾期天数": 2}, True),
    ("-余额 + 3 * 2 % 4 // 1 < 0", {"余额": 3}, True),
    ("(余额 - 1) * 2 == 4", {"余额": 3}, True),
    ("状态 in ['下滑', '停业']", {"状态": "停业"}, True),
    ("状态 not in 差的状态", {"状态": "正常"}, True),
    ("`申请金额(万元)` >= 50", {"申请金额(万元)": 60}, True),
    ("日期 >= '2024-01-01'", {"日期": "2024-03-01"}, True),
    ("ｄｔｉ > 1", {"dti": 2}, True),  # identifiers are compared NFKC-folded, as Python's parser folds them
    ("true and not false", {}, True),
    ("True", {}, True),
])
def test_values(src, values, want):
    assert ev(src, **values) is want


def test_missing_values_are_unknown_and_a_rule_needing_one_does_not_fire():
    e = compile_expr("逾期天数 > 3", KINDS)
    assert e({"逾期天数": None}) is None and e({}) is None and not e.test({"逾期天数": None})
    assert ev("not (逾期天数 > 3)", 逾期天数=None) is None
    assert ev("逾期天数 > 3 or 涉诉", 逾期天数=None, 涉诉=True) is True  # three-valued: unknown or true = true
    assert ev("逾期天数 > 3 or 涉诉", 逾期天数=None, 涉诉=False) is None
    assert ev("逾期天数 > 3 and 涉诉", 逾期天数=None, 涉诉=False) is False
    assert ev("逾期天数 == null", 逾期天数=None) is True and ev("null != 逾期天数", 逾期天数=3) is True
    assert ev("余额 / 逾期天数 > 2", 余额=1, 逾期天数=0) is None  # division by zero: unknown
    assert compile_expr("逾期天数 > 3", KINDS).names == frozenset({"逾期天数"})


@pytest.mark.parametrize("src,msg", [
    ("abs(dti) > 1", "function calls are not allowed"),
    ("__import__('os')", "function calls are not allowed"),
    ("申请金额(万元) > 3", "backticks"),
    ("dti.real > 1", "attribute access"),
    ("().__class__.__bases__", "attribute access"),
    ("dti[0] > 1", "subscripts"),
    ("(lambda: 1) == 1", "lambdas"),
    ("[x for x in 差的状态]", "comprehensions"),
    ("dti ** 2 > 1", r"\*\* is not allowed"),
    ("dti if 涉诉 else 0", "if-expressions"),
    ("f'{dti}' == '1'", "f-strings"),
    ("{'a': 1} == 1", "dictionaries"),
    ("(x := 1)", "assignments"),
    ("dti is None", "== null"),
    ("dti @ 2", "not allowed"),
    ("~dti", "not allowed"),
    ("b'x' == 1", "literal"),
    ("[1, 2]", "only allowed after 'in'"),
    ("dti in [dti]", "literal values"),
    ("dti in dti", "list of values"),
    ("dti < null", "== null"),
    ("dti >", "does not parse"),
    ("", "empty expression"),
    ("`x", "unclosed backtick"),
    ("x" * 1001, "more than 1000"),
    ("未知字段 > 1", "unknown field '未知字段'"),
    ("状态 == '停产'", r"'停产' is not a value of '状态' \(allowed: 正常, 下滑, 停业\)"),
    ("状态 > 3", "compares a text value with a number value"),
    ("涉诉 > 0", "yes/no"),
    ("状态 + 1 > 0", "arithmetic needs numbers"),
    ("日期 > '2024/1/1'", "YYYY-MM-DD"),
    ("交易 == 1", "list field"),
])
def test_refused(src, msg):
    with pytest.raises(ExprError, match=msg):
        compile_expr(src, KINDS, constants=CONSTANTS, categories=CATEGORIES)


def test_runtime_type_error_is_an_expr_error():
    e = compile_expr("状态 < 逾期天数", {"状态": "any", "逾期天数": "number"})
    with pytest.raises(ExprError, match="cannot compare 'x' < 1"):
        e({"状态": "x", "逾期天数": 1})


def test_user_text_is_only_ever_parsed_to_an_ast(monkeypatch):
    """No ``eval``/``exec``, and ``compile`` only as :func:`ast.parse` calls it (to an AST, never to code)."""
    real_compile = builtins.compile

    def guarded_compile(source, filename, mode, flags=0, *args, **kwargs):
        assert flags & ast.PyCF_ONLY_AST, "user text compiled to code"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def refuse(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "compile", guarded_compile)
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    e = compile_expr("逾期天数 > 上限 and 状态 in 差的状态", KINDS, constants=CONSTANTS, categories=CATEGORIES)
    assert e({"逾期天数": 100, "状态": "停业"}) is True

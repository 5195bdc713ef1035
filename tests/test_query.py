"""The `--where` grammar (issue 15): Python's syntax tree, Arrow compute expressions.

The report here is crafted and written by the real `ReportWriter` (no Ray); rows are read
back by the real reader, filtered by `query.filter_rows` and through the CLI. Expected
rows are written out by hand, and a random-expression test compares the engine with a
three-valued (SQL) reference evaluator written out below.
"""

from __future__ import annotations

import csv
import io
import json
import random

import pytest

from llm_audit.cli import main
from llm_audit.errors import UsageError
from llm_audit.report.commands import DIFF_COLUMNS, SHOW_COLUMNS, diff_fields
from llm_audit.report.diff import diff_reports
from llm_audit.report.query import MAX_LENGTH, compile_where, filter_rows, sort_rows
from llm_audit.report.reader import load_report
from llm_audit.report.schema import LAYERS_SCHEMA

from .test_trust_reports import _row, write_report

AND_NAME = "model.x and y's 'weight'"  # a matrix name holding ' and ' and quotes
ROWS = [
    # name, kind, layer, alpha, rand_num_spikes, trap_ratio, transposed
    ("a", "expert_down", 0, 1.5, 2, 2.5, True),
    ("b", "expert_up", 0, 3.0, 0, 0.8, False),
    ("c", "q_proj", 1, None, 0, None, None),
    (AND_NAME, "o_proj", 1, 4.5, 1, 3.0, True),
    ("e", "expert_down", 2, 6.5, 0, 1.2, None),
    ("f", "router", None, 2.0, 3, 2.0, False),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rows = []
    for name, kind, layer, alpha, spikes, ratio, transposed in ROWS:
        row = _row(
            name,
            kind=kind,
            layer=layer,
            alpha=alpha,
            rand_num_spikes=spikes,
            trap_ratio=ratio,
            transposed=transposed,
            num_spikes=spikes + 1,
        )
        if alpha is None:
            row.update(status="error", error="tensor 'c': NaN entries")
        rows.append(row)
    return write_report(tmp_path_factory.mktemp("query") / "r", rows)


@pytest.fixture(scope="module")
def rows(folder):
    return load_report(folder).rows


def names(rows, where):
    return [r["matrix"] for r in filter_rows(rows, where, LAYERS_SCHEMA)]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("alpha < 2", ["a"]),
        ("alpha >= 2 and alpha <= 4.5", ["b", AND_NAME, "f"]),
        # precedence: and binds tighter than or; not tighter than and
        ("kind == 'router' or alpha > 4 and layer == 1", [AND_NAME, "f"]),
        ("(kind == 'router' or alpha > 4) and layer == 1", [AND_NAME]),
        ("not alpha > 4 and rand_num_spikes > 0", ["a", "f"]),
        ("not (alpha > 4 and rand_num_spikes > 0)", ["a", "b", "c", "e", "f"]),  # c: not false
        # in / not in, with text and with numbers (2.0 equals layer 2, 2.5 never does)
        ("kind in ('expert_down', 'expert_up')", ["a", "b", "e"]),
        ("kind not in ['expert_down', 'expert_up']", ["c", AND_NAME, "f"]),
        ("layer in (1, 2.0, 2.5)", ["c", AND_NAME, "e"]),
        ("layer not in (0,)", ["c", AND_NAME, "e"]),
        ("alpha in (1.5, 3)", ["a", "b"]),
        ("kind in ()", []),
        # chained comparisons
        ("1 < alpha < 4", ["a", "b", "f"]),
        ("0 <= layer < 2 != rand_num_spikes", ["b", "c", AND_NAME]),
        ("-1 < layer <= +1", ["a", "b", "c", AND_NAME]),
        # quoted text holding ' and ', quotes, and compared the other way round
        (f"matrix == {AND_NAME!r}", [AND_NAME]),
        ("matrix == \"model.x and y's 'weight'\"", [AND_NAME]),
        ("'o_proj' == kind", [AND_NAME]),
        ("matrix > 'b' and matrix < 'm'", ["c", "e", "f"]),
        # bool columns, alone or compared
        ("transposed", ["a", AND_NAME]),
        ("not transposed", ["b", "f"]),
        ("transposed == False", ["b", "f"]),
        ("transposed != True", ["b", "f"]),
        # two columns; missing values
        ("trap_ratio > alpha", ["a"]),
        ("alpha is None", ["c"]),
        ("transposed is None", ["c", "e"]),
        ("layer is not None and alpha is not None", ["a", "b", AND_NAME, "e"]),
        # an empty result
        ("alpha > 100", []),
    ],
)
def test_where_selects_these_rows(rows, where, expected):
    assert names(rows, where) == expected


def test_missing_values_are_unknown_as_in_sql(rows):
    # alpha is missing in c: neither alpha < 2 nor its negation matches it...
    assert "c" not in names(rows, "alpha < 2") + names(rows, "not (alpha < 2)")
    assert "c" not in names(rows, "alpha not in (1.5,)") + names(rows, "not (alpha in (1.5,))")
    # ...but unknown or true is true, and unknown and false is false
    assert "c" in names(rows, "alpha < 2 or kind == 'q_proj'")
    assert names(rows, "alpha < 2 and kind == 'q_proj'") == []
    # a missing layer (f) is not in any list, and not outside any either
    assert "f" not in names(rows, "layer in (0, 1, 2)") + names(rows, "layer not in (7,)")


def test_rows_keep_plan_order_and_are_the_readers_dicts(rows):
    kept = filter_rows(rows, "rand_num_spikes >= 0", LAYERS_SCHEMA)
    assert kept == rows and all(k is r for k, r in zip(kept, rows, strict=True))


def _bad(rows, where) -> str:
    with pytest.raises(UsageError) as err:
        filter_rows(rows, where, LAYERS_SCHEMA)
    message = str(err.value)
    assert message.startswith("--where: ") and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("__import__('os').system('echo pwned')", "a function call is not allowed: "),
        ("open('/etc/passwd')", "a function call is not allowed: open('/etc/passwd')"),
        ("alpha.real > 1", "an attribute is not allowed: alpha.real"),
        ("trap_ratios[0] > 1", "a subscript is not allowed: trap_ratios[0]"),
        ("alpha * 2 > 3", "arithmetic is not allowed: alpha * 2"),
        ("alpha > 2 & layer < 3", "& or | (write and / or) is not allowed"),
        ("(lambda: 1)() > 0", "a function call is not allowed"),
        ("f'{alpha}' == 'x'", "an f-string is not allowed"),
        ("(x := 3) > alpha", "an assignment is not allowed"),
        ("alpha > (1 if layer else 2)", "an if-expression is not allowed"),
        ("[r for r in ()] == alpha", "a comprehension is not allowed"),
        ("~transposed", "this operator is not allowed: ~transposed"),
        ("alpha == (layer > 1)", "a comparison where a value is expected"),
        ("alpha in (1, layer)", "column layer where a value is expected"),
        ("kind in 'expert_down'", "`in` needs a list of values on its right"),
        ("'expert' in kind", "`in` needs a column on its left"),
        ("1 < 2", "compares two values: one side must be a column"),
        ("True", "True alone is not a condition on a column"),
        ("alpha", "alpha is a double column, not a condition: compare it"),
        ("alpha == None", "None only in COLUMN is None / COLUMN is not None"),
        ("alpha is 3", "`is` only in COLUMN is None / COLUMN is not None"),
        ("kind == b'x'", "b'x' is not a number, a quoted text, True or False"),
        ("alpha > 1j", "1j is not a number"),
        ("layer > 10**30", "arithmetic is not allowed"),
        ("layer > 100000000000000000000000000000", "out of the 64-bit integer range"),
        ("alpha = 3", "not an expression (invalid syntax"),
        ("alpha > 3 AND layer == 1", "; join with and / or / not"),
        ("", "empty; the grammar: COLUMN OP VALUE"),
        ("alpha > 1 and", "not an expression"),
        ("kind == '\x00'", "not an expression"),
    ],
)
def test_forbidden_and_malformed_expressions_are_one_clear_line(rows, where, message):
    assert message in _bad(rows, where)


def test_syntax_error_hints_at_equals(rows):
    assert "; compare with ==" in _bad(rows, "alpha = 3")
    assert "compare with ==" not in _bad(rows, "alpha >= 3 AND layer == 1")


def test_unknown_columns_name_close_matches_and_bare_words_get_a_quote_hint(rows):
    message = _bad(rows, "alpah > 3")
    assert "unknown column 'alpah' (did you mean alpha" in message and "quotes" not in message
    # the old mini-language's unquoted value
    message = _bad(rows, "rand_num_spikes > 0 and kind == expert_down")
    assert "unknown column 'expert_down'" in message
    assert "a text value needs quotes: kind == 'expert_down'" in message
    message = _bad(rows, "kind in (expert_down, 'expert_up')")
    assert "a text value needs quotes: kind in ('expert_down', ...)" in message
    assert "unknown column 'nope'" in _bad(rows, "nope is None")


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("kind > 3", "kind is a string column and 3 is a number: kind > 3 (quote text values)"),
        ("alpha == 'x'", "alpha is a double column and 'x' is a text: alpha == 'x'"),
        ("layer in (1, 'two')", "layer is a int64 column and 'two' is a text"),
        ("alpha > True", "alpha is a double column and True is a bool"),
        ("transposed == 1", "transposed is a bool column and 1 is a number"),
        ("transposed > False", "transposed is a bool column: use == or !="),
        ("kind < alpha", "kind is a string column and alpha a double column"),
        ("trap_ratios == 1.0", "trap_ratios is a list<item: double> column: it cannot be"),
        ("trap_entries is None", "trap_entries is a list<item: struct"),
    ],
)
def test_type_mismatches_name_the_column_its_type_and_the_value(rows, where, message):
    assert message in _bad(rows, where)


def test_size_caps(rows):
    long = "alpha > 1 or " * (MAX_LENGTH // 13 + 1) + "alpha > 1"
    assert f"more than {MAX_LENGTH}" in _bad(rows, long)
    assert "nested more than" in _bad(rows, "not " * 60 + "transposed")
    assert "more than 1000 terms" in _bad(rows, "layer in (" + "1," * 994 + ")")
    many = "layer in (" + ",".join(map(str, range(300))) + ")"  # a long list is fine
    assert names(rows, many) == ["a", "b", "c", AND_NAME, "e"]


def test_one_arrow_expression_and_the_columns_it_reads():
    expression, used = compile_where("alpha > 1 and kind in ('q_proj',)", LAYERS_SCHEMA)
    assert used == {"alpha", "kind"}
    assert str(expression).startswith("((alpha > 1) and if_else(is_valid(kind), is_in(kind")


# --- against a reference: random expressions, three-valued logic written out -------------

NUMERIC = ("alpha", "layer", "rand_num_spikes", "trap_ratio")
OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _random_expression(rng: random.Random, depth: int = 0) -> tuple[str, object]:
    """(text, tree): a random condition and the structure the reference evaluates."""
    if depth < 3 and rng.random() < 0.6:
        op = rng.choice(("and", "or", "not"))
        if op == "not":
            text, tree = _random_expression(rng, depth + 1)
            return f"not ({text})", ("not", tree)
        (lt, ltree), (rt, rtree) = (_random_expression(rng, depth + 1) for _ in range(2))
        return f"({lt}) {op} ({rt})", (op, ltree, rtree)
    column = rng.choice(NUMERIC)
    if rng.random() < 0.25:
        values = tuple(rng.choice((0, 1, 1.5, 2, 3.0, 4.5)) for _ in range(rng.randint(1, 3)))
        negated = rng.random() < 0.5
        return f"{column} {'not in' if negated else 'in'} {values!r}", (
            "in",
            column,
            values,
            negated,
        )
    op, value = rng.choice(tuple(OPS)), rng.choice((0, 1, 1.5, 2, 2.5, 3.0, 4.5))
    return f"{column} {op} {value!r}", ("cmp", column, op, value)


def _reference(tree, row) -> bool | None:
    """Kleene logic: None is unknown."""
    kind = tree[0]
    if kind == "not":
        inner = _reference(tree[1], row)
        return None if inner is None else not inner
    if kind in ("and", "or"):
        a, b = _reference(tree[1], row), _reference(tree[2], row)
        if kind == "and":
            return False if False in (a, b) else None if None in (a, b) else True
        return True if True in (a, b) else None if None in (a, b) else False
    if kind == "in":
        _, column, values, negated = tree
        if row[column] is None:
            return None
        return (row[column] in values) != negated
    _, column, op, value = tree
    return None if row[column] is None else OPS[op](row[column], value)


def test_random_expressions_match_a_three_valued_reference(rows):
    rng = random.Random(2026)
    for _ in range(300):
        text, tree = _random_expression(rng)
        expected = [r["matrix"] for r in rows if _reference(tree, r) is True]
        assert names(rows, text) == expected, text


# --- --sort --------------------------------------------------------------------------------


def test_sort_any_column_missing_last_ties_in_plan_order(rows):
    by = [r["matrix"] for r in sort_rows(rows, "layer", False, LAYERS_SCHEMA)]
    assert by == ["a", "b", "c", AND_NAME, "e", "f"]
    by = [r["matrix"] for r in sort_rows(rows, "layer", True, LAYERS_SCHEMA)]
    assert by == ["e", "c", AND_NAME, "a", "b", "f"]  # ties keep plan order, descending too
    by = [r["matrix"] for r in sort_rows(rows, "transposed", True, LAYERS_SCHEMA)]
    assert by == ["a", AND_NAME, "b", "f", "c", "e"]
    with pytest.raises(UsageError, match="unknown column 'alpah' \\(did you mean alpha"):
        sort_rows(rows, "alpah", False, LAYERS_SCHEMA)
    with pytest.raises(UsageError, match="trap_entries is a list"):
        sort_rows(rows, "trap_entries", False, LAYERS_SCHEMA)


# --- through the CLI ---------------------------------------------------------------------


def _show(capsys, folder, *extra: str) -> str:
    assert main(["report", "show", str(folder), *extra]) == 0
    return capsys.readouterr().out


def _one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_where_sort_top(folder, capsys):
    where = "rand_num_spikes > 0 and kind in ('expert_down', 'o_proj', 'router')"
    out = _show(capsys, folder, "--where", where, "--sort", "alpha", "--desc", "--top", "2")
    lines = out.splitlines()
    assert "showing 2" in lines[1]
    assert lines[3].startswith(AND_NAME) and lines[4].startswith("f ")
    _one_line_exit_2(
        capsys,
        ["report", "show", str(folder), "--where", "kind == expert_down"],
        "llm-audit: error: --where: unknown column 'expert_down'",
    )
    _one_line_exit_2(
        capsys, ["report", "show", str(folder), "--where", "kind > 3"], "kind is a string column"
    )
    _one_line_exit_2(
        capsys, ["report", "show", str(folder), "--sort", "nope"], "--sort: unknown column"
    )


@pytest.mark.parametrize("top", ["0", "-3", "two"])
def test_top_wants_a_positive_count(folder, capsys, top):
    for argv in (["report", "show", str(folder)], ["diff", str(folder), str(folder)]):
        with pytest.raises(SystemExit) as done:
            main([*argv, "--top", top])
        assert done.value.code == 2
        assert "--top: want a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # the same type: plan --min-evals -5 planned all
        main(["plan", str(folder), "--min-evals", top])
    assert "--min-evals: want a whole number >= 1" in capsys.readouterr().err


def test_table_csv_and_json_print_the_same_columns(folder, capsys):
    for columns, expected in (
        (None, list(SHOW_COLUMNS)),
        ("matrix, alpha,trap_ratio,alpha", ["matrix", "alpha", "trap_ratio"]),
        ("all", LAYERS_SCHEMA.names),
    ):
        extra = ["--where", "kind == 'expert_down'"] + (["--columns", columns] if columns else [])
        table = _show(capsys, folder, *extra).splitlines()
        assert table[2].split() == expected
        assert [line.split()[0] for line in table[3:]] == ["a", "e"]
        csv_rows = list(csv.reader(io.StringIO(_show(capsys, folder, *extra, "--format", "csv"))))
        assert csv_rows[0] == expected and len(csv_rows) == 3
        records = json.loads(_show(capsys, folder, *extra, "--format", "json"))
        assert [list(r) for r in records] == [expected, expected]
    records = json.loads(_show(capsys, folder, "--format", "json", "--columns", "alpha,matrix"))
    assert records[0] == {"alpha": 1.5, "matrix": "a"}  # full precision, in the asked order
    for bad, message in (("alpah", "unknown column 'alpah' (did you mean alpha"), (",", "empty")):
        _one_line_exit_2(capsys, ["report", "show", str(folder), "--columns", bad], message)


def test_diff_columns_are_consistent_across_formats(folder, tmp_path, capsys):
    report = load_report(folder)
    rows = [dict(r) | {"alpha": 2.0 if r["alpha"] is not None else None} for r in report.rows]
    other = write_report(tmp_path / "b", rows)
    assert list(diff_reports(report, load_report(other))[0]) == diff_fields()
    argv = ["diff", str(folder), str(other)]
    for columns, expected in (
        (None, list(DIFF_COLUMNS)),
        ("matrix,d_alpha", ["matrix", "d_alpha"]),
        ("all", diff_fields()),
    ):
        extra = ["--columns", columns] if columns else []
        assert main([*argv, *extra]) == 0
        assert capsys.readouterr().out.splitlines()[1].split() == expected
        assert main([*argv, *extra, "--format", "csv"]) == 0
        assert next(csv.reader(io.StringIO(capsys.readouterr().out))) == expected
        assert main([*argv, *extra, "--format", "json"]) == 0
        records = json.loads(capsys.readouterr().out)
        assert len(records) == len(ROWS) and all(list(r) == expected for r in records)
    _one_line_exit_2(capsys, [*argv, "--columns", "d_alpa"], "did you mean d_alpha")


def test_csv_list_cells_are_json(tmp_path, capsys):
    entries = [{"row": 1, "col": 2, "value": -0.5}]
    row = _row("a", rand_num_spikes=1, trap_evals=[3.0], trap_ratios=[1.5], trap_entries=entries)
    folder = write_report(tmp_path / "r", [row])
    shown = _show(capsys, folder, "--format", "csv", "--columns", "trap_entries,trap_ratios")
    (cells,) = csv.DictReader(io.StringIO(shown))
    assert json.loads(cells["trap_entries"]) == entries  # not Python's repr
    assert json.loads(cells["trap_ratios"]) == [1.5]


def test_diff_summary_counts_every_matrix_and_top_only_limits_the_rows(folder, tmp_path, capsys):
    gained = {"a": 1, "b": 2, "f": 4}  # new traps in 3 of the 6 matrices, 7 in all
    report = load_report(folder)
    rows = [
        dict(r) | {"rand_num_spikes": r["rand_num_spikes"] + gained.get(r["matrix"], 0)}
        for r in report.rows
    ]
    other = write_report(tmp_path / "b", rows)
    argv = ["diff", str(folder), str(other)]
    assert main(argv) == 0
    full = capsys.readouterr().out.splitlines()
    assert full[0] == "6 matrices compared; 7 new traps in 3 matrices"
    assert main([*argv, "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "6 matrices compared; 7 new traps in 3 matrices (showing the top 1)"
    # the header and the one row with most new traps (column widths fit the rows shown)
    assert [line.split() for line in lines[1:]] == [line.split() for line in full[1:3]]
    assert main([*argv, "--top", "6"]) == 0
    assert capsys.readouterr().out.splitlines() == full  # nothing left out, nothing said
    assert main([*argv, "--top", "1", "--format", "json"]) == 0
    assert [r["matrix"] for r in json.loads(capsys.readouterr().out)] == ["f"]

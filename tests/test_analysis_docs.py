"""Every ```python block of docs/analysis.md runs, in order, against a hand-made run folder;
a block that ends in an expression must give a non-empty result."""

import ast
import re
from pathlib import Path

import polars as pl
import pytest

from test_report import write_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The names the doc assumes: `runs` = a folder with the experiments it queries."""
    runs = tmp_path_factory.mktemp("runs")
    write_run(runs, "multi_prompt_v3", prompts=("trait_a", "trait_b", "neutral"), neutral="neutral", heuristics=True)
    write_run(runs, "v4", prompts=("trait_c", "neutral"), neutral="neutral")
    write_run(runs, "em", prompts=("trait_a",), em=True)
    write_run(runs, "demo", prompts=("trait_a",), seeds=(0, 1))
    return {"runs": str(runs)}


def test_doc_has_the_snippets():
    assert len(BLOCKS) >= 12
    for block in BLOCKS:
        assert len(block.strip().splitlines()) < 10, f"snippet over 9 lines:\n{block}"


def run_block(session: dict, i: int) -> None:
    tree = ast.parse(BLOCKS[i])
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    where = f"docs/analysis.md python block {i + 1}"
    exec(compile(tree, where, "exec"), session)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), where, "eval"), session)
        value = value.collect() if isinstance(value, pl.LazyFrame) else value
        assert value is None or len(value) > 0, f"{where} gives an empty result:\n{BLOCKS[i]}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs(session, index):
    ran = session.setdefault("_ran", set())
    for i in range(index + 1):  # the earlier blocks define what this one uses
        if i not in ran:
            run_block(session, i)
            ran.add(i)

"""The README and docs/ stay true to the results files they quote, and a reader can walk them.

Every table of measured numbers is preceded by a comment naming the results file it was taken from and, per
column, the template its cells are printed with:

  <!-- results: launch/results/ablation.json paper=launch/ablation.py:PAPER
  r = doc["cells"][key]
  | {key} | {100 * r["test_miou_mean"]:.1f} ± {100 * r["test_miou_std"]:.1f} | - |
  -->

The first file is `doc`; `NAME=FILE.json` or `NAME=FILE.py:VARIABLE` (a literal, read without importing the file)
add more. For each row of the table that follows, `key` is its first cell (backticks removed) and `i` its index;
`name = expression` lines bind names in order; the `|` line holds one template per column, `-` for a column not
checked. A template's `{expression:format}` fields are filled in with Python's format specs and the result must
equal the cell, so a number changed by hand, or a results file re-written without the doc, fails here.
No JAX: this reads text and JSON only.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import statistics

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
# What CI runs (.ci/run) and what a reader copies first: unchanged, on the README's first screen.
SETUP_COMMANDS = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . && python -m '
    'scaleattn.main --config=configs/shapes.py --workdir=workdirs/shapes',
    'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e ".[test]" && python -m '
    'pytest -q',
)
_SPEC = re.compile(r"[<>=^]?[+\- ]?#?0?\d*,?(?:\.\d+)?[bdeEfFgGn%xX]?")
_HELPERS = {"abs": abs, "float": float, "format": format, "int": int, "len": len, "max": max, "min": min,
            "range": range, "round": round, "sorted": sorted, "str": str, "sum": sum, "zip": zip,
            "mean": statistics.mean, "stdev": statistics.stdev, "math": math}


def _eval(expression: str, scope: dict) -> object:
  """An expression of a template, with the table's names and a few helpers (no other builtins)."""
  return eval(expression, {**scope, "__builtins__": {}})  # noqa: S307 - templates written in this repository


def _doc_files() -> list[str]:
  docs = sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")) if os.path.isdir(DOCS) else []
  return [README, *docs, os.path.join(ROOT, "launch", "README.md")]


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _rel(path: str) -> str:
  return os.path.relpath(path, ROOT)


# ---------------------------------------------------------------------------------------------------------------
# Results tables.


def _load_source(spec: str, base: str) -> object:
  """`FILE.json` (parsed) or `FILE.py:VARIABLE` (the literal assigned to VARIABLE), relative to the repository."""
  path, _, variable = spec.partition(":")
  full = os.path.join(ROOT, path)
  assert os.path.isfile(full), f"{base}: results source {path} does not exist"
  if not variable:
    with open(full, encoding="utf-8") as f:
      return json.load(f)
  for node in ast.parse(_read(full)).body:
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
      return ast.literal_eval(node.value)
  raise AssertionError(f"{base}: {path} assigns no literal {variable}")


def _split_row(line: str) -> list[str]:
  line = line.strip()
  assert line.startswith("|") and line.endswith("|"), line
  cells = re.split(r"(?<!\\)\|", line[1:-1])
  return [c.strip() for c in cells]


def _fields(template: str) -> list[tuple[str, str | None, str | None]]:
  """The template as (literal text, expression, format) pieces; braces balanced, strings skipped."""
  pieces, text, i = [], "", 0
  while i < len(template):
    if template[i] != "{":
      text += template[i]
      i += 1
      continue
    depth, j, quote = 0, i, None
    while j < len(template):
      ch = template[j]
      if quote:
        quote = None if ch == quote else quote
      elif ch in "\"'":
        quote = ch
      elif ch == "{":
        depth += 1
      elif ch == "}":
        depth -= 1
        if depth == 0:
          break
      j += 1
    assert depth == 0, f"unbalanced braces in template {template!r}"
    inner, spec = template[i + 1:j], None
    head, sep, tail = inner.rpartition(":")
    if sep and _SPEC.fullmatch(tail):
      try:
        compile(head, "<template>", "eval")
        inner, spec = head, tail
      except SyntaxError:
        pass
    pieces.append((text, inner, spec))
    text, i = "", j + 1
  pieces.append((text, None, None))
  return pieces


def _render(template: str, names: dict) -> str:
  out = []
  for text, expression, spec in _fields(template):
    out.append(text)
    if expression is not None:
      value = _eval(expression, names)
      out.append(format(value, spec or ""))
  return "".join(out)


def _annotated_tables() -> list[tuple[str, int, str, list[str], list[str]]]:
  """(file, line of the comment, comment body, table rows, ...) for every `<!-- results:` comment."""
  found = []
  for path in _doc_files():
    lines = _read(path).splitlines()
    for n, line in enumerate(lines):
      if not line.startswith("<!-- results:"):
        continue
      end = next(k for k in range(n, len(lines)) if lines[k].rstrip().endswith("-->"))
      comment = "\n".join(lines[n:end + 1])[len("<!-- results:"):].rstrip()[:-3]
      k = end + 1
      while k < len(lines) and not lines[k].strip():
        k += 1
      table = []
      while k < len(lines) and lines[k].startswith("|"):
        table.append(lines[k])
        k += 1
      found.append((_rel(path), n + 1, comment, table))
  return found


def _check_table(where: str, comment: str, table: list[str]) -> int:
  """Compares every checked cell; returns the number of cells compared."""
  first, *rest = comment.strip().splitlines()
  sources = first.split()
  names = {"doc": _load_source(sources[0], where)}
  for extra in sources[1:]:
    name, _, spec = extra.partition("=")
    names[name] = _load_source(spec, where)
  bindings = [line.strip() for line in rest if line.strip() and not line.strip().startswith("|")]
  templates = [line for line in rest if line.strip().startswith("|")]
  assert len(templates) == 1, f"{where}: one '|' template line expected"
  templates = _split_row(templates[0])
  assert len(table) >= 3, f"{where}: no table follows the results comment"
  header = _split_row(table[0])
  assert len(templates) == len(header), f"{where}: {len(templates)} templates for {len(header)} columns"
  compared, problems = 0, []
  for i, line in enumerate(table[2:]):
    cells = _split_row(line)
    assert len(cells) == len(header), f"{where}: row {i + 1} has {len(cells)} cells, the header {len(header)}"
    scope = {**_HELPERS, **names, "key": cells[0].replace("`", ""), "i": i, "cells": cells}
    try:
      for binding in bindings:
        name, _, expression = binding.partition("=")
        scope[name.strip()] = _eval(expression, scope)
    except (LookupError, TypeError, ValueError) as e:  # e.g. a row whose key the file does not have
      problems.append(f"row {cells[0]!r}: not found in {sources[0]} ({e!r})")
      continue
    for column, (template, cell) in enumerate(zip(templates, cells, strict=True)):
      if template == "-":
        continue
      try:
        expected = _render(template, scope)
      except (LookupError, TypeError, ValueError) as e:
        expected = f"<{e!r}>"
      compared += 1
      if expected != cell:
        problems.append(f"row {cells[0]!r}, column {header[column]!r}: the doc says {cell!r}, "
                        f"{sources[0]} gives {expected!r}")
  assert not problems, f"{where}: table differs from its results file:\n  " + "\n  ".join(problems)
  return compared


TABLES = _annotated_tables()


def test_results_tables_are_annotated():
  """The README's results and every topic page that quotes measurements keep their tables checked."""
  files = {t[0] for t in TABLES}
  for name in ("README.md", "docs/results.md", "docs/scale-sets.md", "docs/performance.md", "docs/inference.md",
               "docs/tpu-and-gpu.md"):
    assert name in files, f"{name} has no table checked against a results file"


@pytest.mark.parametrize("where,line,comment,table", TABLES, ids=[f"{t[0]}:{t[1]}" for t in TABLES])
def test_results_table_matches_its_file(where, line, comment, table):
  assert _check_table(f"{where}:{line}", comment, table) > 0


def test_a_number_changed_by_hand_is_caught():
  """The checker itself: in every checked table, one digit changed in a checked cell fails it."""
  for where, line, comment, table in TABLES:
    templates = _split_row(next(t for t in comment.splitlines() if t.strip().startswith("|")))
    row = _split_row(table[2])
    column = next(c for c, (t, cell) in enumerate(zip(templates, row, strict=True))
                  if t != "-" and re.search(r"\d", cell))
    digit = re.search(r"\d", row[column]).start()
    row[column] = row[column][:digit] + str((int(row[column][digit]) + 1) % 10) + row[column][digit + 1:]
    changed = "| " + " | ".join(row) + " |"
    with pytest.raises(AssertionError, match="differs from its results file"):
      _check_table(f"{where}:{line}", comment, [table[0], table[1], changed, *table[3:]])


# ---------------------------------------------------------------------------------------------------------------
# Shape of the README, links.


def test_readme_is_short_and_starts_with_the_setup_commands():
  lines = _read(README).splitlines()
  assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
  first_screen = "\n".join(lines[:40])
  for command in SETUP_COMMANDS:
    assert command in first_screen, f"the first 40 lines of README.md must hold: {command}"


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _strip_code(text: str) -> str:
  return re.sub(r"```.*?```", "", text, flags=re.S)


@pytest.mark.parametrize("path", _doc_files(), ids=_rel)
def test_relative_links_point_at_files(path):
  text = _strip_code(_read(path))
  missing = []
  for target in _LINK.findall(text):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    file_part = target.split("#", 1)[0]
    if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), file_part))):
      missing.append(target)
  assert not missing, f"{_rel(path)} links to missing files: {missing}"


@pytest.mark.parametrize("path", _doc_files(), ids=_rel)
def test_named_results_files_exist(path):
  """A results file named in prose (`launch/results/x.json`) exists, as the figures drawn from it must."""
  text = _read(path)
  base = os.path.dirname(path) if path.startswith(os.path.join(ROOT, "launch")) else ROOT
  named = set(re.findall(r"(?:launch/)?results/[\w.\-]+\.(?:json|md|png)", text))
  missing = []
  for name in named:
    full = os.path.join(ROOT, name) if name.startswith("launch/") else os.path.join(base, name)
    if not os.path.isfile(full) and not os.path.isfile(os.path.join(ROOT, "launch", name)):
      missing.append(name)
  assert not missing, f"{_rel(path)} names results files that do not exist: {missing}"


def test_docs_are_reachable_from_the_readme():
  """Every page under docs/ is linked from the README, so a reader can walk to it."""
  readme = _read(README)
  for page in sorted(os.listdir(DOCS)):
    if page.endswith(".md"):
      assert f"docs/{page}" in readme, f"docs/{page} is not linked from README.md"

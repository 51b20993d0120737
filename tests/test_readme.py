"""The README's reading guide cites line ranges; check each one against the code with `ast`, so it cannot go stale.

A reference is one or two backticked names and a range, in one of two forms:
  `name` (a-b)   `name` (file.py a-b)   `first` and `last` (a-b)
  `name`, a-b    `name`, lines a-b      `first` and `last`, a-b      (usually inside a parenthesis)
`Class.member` is a method or a class-level field; a bare name is a module-level def, class or assignment, else the
only def/class of that name in the file. A span runs from the first decorator line (the `def`/`class` line when
there is none; an assignment's first line) to the node's `end_lineno`; two names span from the first one's start to
the second one's end. The file is the one named in the parenthesis, else the one file, among those the item names
before the reference, that defines the name. Every `a-b` in the guide must be part of a reference.
"""
import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = r"`(?P<first>[\w.]+)`(?:\s+and\s+`(?P<last>[\w.]+)`)?"
REFERENCE = re.compile(
    NAMES + r"(?:\s*\((?:(?P<file>\w+\.py)\s+)?(?P<a>\d+)-(?P<b>\d+)\)"  # `name` (a-b), `name` (file.py a-b)
    r"|,\s+(?:lines\s+)?(?P<a2>\d+)-(?P<b2>\d+))")  # `name`, a-b
RANGE = re.compile(r"\b\d+-\d+\b")
FILE = re.compile(r"\b\w+\.py\b")


def guide_items() -> list[tuple[int, str]]:
    """(item number, text joined onto one line) for each numbered paragraph of 'Read the code in this order'."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Read the code in this order\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md: no '## Read the code in this order' section followed by another '## ' section"
    items = re.split(r"^(\d+)\. ", section.group(1), flags=re.M)[1:]
    return [(int(number), " ".join(body.split())) for number, body in zip(items[::2], items[1::2], strict=True)]


@cache
def tree(file: str) -> ast.Module:
    return ast.parse((ROOT / file).read_text(), file)


def defines(node: ast.AST, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))


def span(node: ast.AST) -> tuple[int, int]:
    return min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno]), node.end_lineno


def find(file: str, name: str) -> ast.AST | None:
    """The node `name` names in `file` (see the module docstring), or None when there is none or several."""
    module = tree(file)
    if "." in name:
        owner, member = name.split(".")
        classes = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == owner]
        found = [n for c in classes for n in c.body if defines(n, member)]
    else:
        found = [n for n in module.body if defines(n, name)] or [
            n for n in ast.walk(module)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name]
    return found[0] if len(found) == 1 else None


def check(number: int, text: str, match: re.Match) -> str | None:
    """None when the reference is right, else a message naming it and the range the code gives."""
    names = [n for n in match.group("first", "last") if n]
    cited = (int(match.group("a") or match.group("a2")), int(match.group("b") or match.group("b2")))
    files = [match.group("file")] if match.group("file") else list(dict.fromkeys(FILE.findall(text[:match.start()])))
    where = {f: [find(f, n) for n in names] for f in files if (ROOT / f).is_file()}
    where = {f: nodes for f, nodes in where.items() if None not in nodes}
    label = f"README item {number}: {match.group(0)!r}"
    if len(where) != 1:
        problem = (f"defined in several of {files}: name the file, as in (file.py a-b)" if where else
                   f"not defined exactly once in any of {files}: write `Class.member`, or name the file")
        return f"{label}: {' and '.join(names)} {problem}"
    (file, nodes), = where.items()
    actual = (span(nodes[0])[0], span(nodes[-1])[1])
    if actual != cited:
        return f"{label}: {file} has it at lines {actual[0]}-{actual[1]}, not {cited[0]}-{cited[1]}"
    return None


def test_reading_guide_line_ranges_match_the_code():
    items = guide_items()
    matches = [(number, text, m) for number, text in items for m in REFERENCE.finditer(text)]
    assert len(matches) >= 30, f"only {len(matches)} references parsed from the reading guide; did its format change?"
    problems = [p for number, text, m in matches if (p := check(number, text, m))]
    assert not problems, "stale line ranges in README.md's reading guide:\n" + "\n".join(problems)


def test_every_range_in_the_reading_guide_is_a_checked_reference():
    unparsed = []
    for number, text in guide_items():
        covered = [m.span() for m in REFERENCE.finditer(text)]
        for r in RANGE.finditer(text):
            if not any(start <= r.start() < end for start, end in covered):
                unparsed.append(f"README item {number}: {text[max(0, r.start() - 40):r.end() + 1]!r}")
    assert not unparsed, ("line ranges that cite no `name` the test can check (write `name` (a-b) or `name`, a-b):\n"
                          + "\n".join(unparsed))

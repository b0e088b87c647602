"""Run the ```python blocks of a Markdown page as printed and check the values their comments
claim (used by test_docs.py and test_readme.py; not a test module itself).

A block runs in a fresh namespace, one top-level statement at a time, so that each `print(...)`
or bare expression statement is paired with what it printed (or the repr of its value) and with
its comment: the trailing comment on the statement's last line, or the comment lines right
below it. A comment claims a value when it starts with

- `~X` or a bare float `X` (e.g. `# ~1e-9: conserved`, `# 6.6e-15`): the magnitude of every
  number the statement printed lies within a factor of 10 of |X|, both ways (an order of
  magnitude);
- an integer `N` (e.g. `# 3 = r(r+1)/2`): the statement gave exactly N;
- a Python literal (`# ['success', 'success']`, `# {'a': 0, …}`, `# True`): the output equals
  it; a `…` inside stands for the rest, and the output must start with what comes before it.
  (Only a literal may sit on the comment lines below a statement: a prose or number line there
  belongs to the next one.)

Any other comment is prose and claims nothing. A block preceded by `<!-- skip: reason -->`
is not run (the reason is required; keep such blocks few).
"""

import ast
import contextlib
import dataclasses
import io
import re
import tokenize

_BLOCK = re.compile(r"(?:<!--\s*skip:(?P<skip>[^>]*?)-->\s*\n)?^```python\n(?P<code>.*?)^```",
                    re.S | re.M)
_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(r"(?<![\w.])" + _FLOAT + r"(?![\w.])")


@dataclasses.dataclass
class Block:
    name: str  # "<page> block <i>"
    code: str
    skip: str | None  # the reason given in `<!-- skip: reason -->`, or None


@dataclasses.dataclass
class Claim:
    line: int  # line of the statement in its block (1-based)
    source: str  # the statement
    comment: str  # the claim's text, without '#'
    output: str  # what the statement printed, or repr of its value


def blocks(text: str, page: str) -> list[Block]:
    """Every ```python block of a Markdown text, in order."""
    return [Block(f"{page} block {i}", m.group("code"),
                  None if m.group("skip") is None else m.group("skip").strip())
            for i, m in enumerate(_BLOCK.finditer(text))]


def _comments(code: str) -> dict[int, tuple[str, bool]]:
    """line → (comment text, whether the line holds only the comment)."""
    found = {}
    lines = code.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            found[row] = (token.string.lstrip("#").strip(), not lines[row - 1][:col].strip())
    return found


def run(block: Block) -> tuple[dict, list[Claim], str]:
    """Execute a block statement by statement in a fresh namespace.

    **Returns:** the namespace, the claims (statements with a comment that is a claim, in
    order, with their output) and everything the block printed.
    """
    tree = ast.parse(block.code)
    comments = _comments(block.code)
    namespace = {"__name__": "__docs__"}
    claims, printed = [], []
    body = tree.body
    for i, stmt in enumerate(body):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            if isinstance(stmt, ast.Expr):
                value = eval(compile(ast.Expression(stmt.value), block.name, "eval"), namespace)
            else:
                exec(compile(ast.Module([stmt], []), block.name, "exec"), namespace)
        text = buffer.getvalue()
        printed.append(text)
        if not isinstance(stmt, ast.Expr):
            continue
        is_print = (isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name)
                    and stmt.value.func.id == "print")
        output = text.rstrip("\n") if is_print else repr(value)
        comment = comments.get(stmt.end_lineno, ("", True))
        text_claim = comment[0] if not comment[1] else ""
        if not text_claim:  # comment lines right below the statement
            stop = body[i + 1].lineno if i + 1 < len(body) else len(block.code.splitlines()) + 1
            below = [comments[r][0] for r in range(stmt.end_lineno + 1, stop)
                     if r in comments and comments[r][1]]
            # Only a literal there: a prose or number line below belongs to the next statement.
            text_claim = below[0] if below and kind(below[0]) == "literal" else ""
        if text_claim and kind(text_claim) != "prose":
            source = ast.get_source_segment(block.code, stmt)
            claims.append(Claim(stmt.lineno, source, text_claim, output))
    return namespace, claims, "".join(printed)


def kind(comment: str) -> str:
    """'order' (~X or a bare float), 'integer', 'literal' or 'prose'."""
    if re.match(r"~\s*" + _FLOAT, comment):
        return "order"
    m = re.match(_FLOAT + r"(?![\w(\[])", comment)
    if m:
        return "integer" if re.fullmatch(r"[-+]?\d+", m.group(0)) else "order"
    if re.match(r"(True|False|None)\b", comment):
        return "literal"
    return "literal" if comment[:1] in "[{('\"" else "prose"


def _literal(comment: str) -> str:
    """The bracketed (or quoted) literal at the start of a comment."""
    word = re.match(r"(True|False|None)\b", comment)
    if word:
        return word.group(1)
    depth, quote = 0, None
    for i, c in enumerate(comment):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
            if depth == 0 and i > 0:
                return comment[:i + 1]
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
            if depth == 0:
                return comment[:i + 1]
    return comment


def check(claim: Claim) -> None:
    """Assert that the claim's output is what its comment says (AssertionError otherwise)."""
    what = kind(claim.comment)
    where = (f"line {claim.line} `{claim.source}` printed {claim.output!r}, "
             f"comment {claim.comment!r}")
    if what == "order":
        target = abs(float(re.match(r"~?\s*(" + _FLOAT + ")", claim.comment).group(1)))
        values = [float(v) for v in _NUMBER.findall(claim.output)]
        assert values, where
        assert all(target / 10 <= abs(v) <= target * 10 for v in values), \
            f"not within 10× of {target:g}: {where}"
    elif what == "integer":
        target = int(re.match(r"[-+]?\d+", claim.comment).group(0))
        assert claim.output.strip() == str(target), where
    elif what == "literal":
        literal = _literal(claim.comment)
        if "…" in literal:
            prefix = literal.split("…")[0].rstrip(" ,")
            assert claim.output.startswith(prefix), where
        else:
            try:
                same = ast.literal_eval(claim.output) == ast.literal_eval(literal)
            except (ValueError, SyntaxError):
                same = claim.output == literal
            assert same, where

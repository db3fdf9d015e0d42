"""A generated wrong version for every flag: each field of ddpo.Args, read everywhere as its default, must fail a test.

For each field of ddpo.Args this builds one mutant: in every module and entry file (ddpo.py, rewards.py, evaluate.py,
export.py, compare.py, bench.py, training_run.py, processes.py, command_line.py, ...) each read of that setting,
`args.FIELD`, `saved.FIELD`, `self.args.FIELD` (evaluate.py and export.py: `run.FIELD`, their `args` is their own
command line) and `getattr(args, name)` where the name is computed, reads the field's default instead: the repr of
dataclasses.fields(ddpo.Args)'s default, or for one computed at import (device) the value Args() holds. Assignments
(`args.FIELD = ...`) stay. The reads are found with ast, so strings, comments and assignment targets are left alone,
and each changed file must still compile. A flag whose value never reaches the code is what the mutant stands for.

Two kinds of read are not changed, so that the mutant is a flag silently ignored, not a flag unchecked:
- the checks (CHECKS: plumbing/command_line.py's range_problem, complete, load_run_args, parse_args with
  --resume's refusals): a flag that is still checked but otherwise ignored is the bug to find, and a range-check
  test must not be what catches it;
- for the settings that complete fills in when left at their placeholder (DERIVED: prompts, lora_rank,
  run_name), only complete()'s reads change: the run goes on with the filled-in default whatever was given,
  instead of crashing on the placeholder ('' prompts, None rank) at its first use, which any test would catch.

The tests run on a mutant are those whose text (the function and its decorators) sets the flag: `--flag-name`,
`field_name=` or "field_name", then those calling a helper of their file that does (tests_for). A field no test sets gets no tests and is reported MISSED without a
run; a field with no reads at all is reported as a dead flag. A field whose default-only version cannot change
anything reachable is listed in EQUIVALENT with the reason, and gets no mutant.

mutation_check.py runs these beside its hand-written MUTANTS, with the same copies, pytest and two-jobs pool:

    python tests/mutation_check.py --flags            # only the generated flag mutants
    python tests/mutation_check.py --flags eta seed   # only those whose name contains one of these words
    python tests/mutation_check.py --no-flags         # only the hand-written ones
    python tests/mutation_check.py --list --flags     # the flag mutants, the files they change and the tests they run
    python tests/flag_mutants.py                      # the same list, with each field's reads per file
"""
import ast
import dataclasses
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the repository (this file is in its tests/)
CODE = ["*.py", "plumbing/*.py", "world/*.py"]  # the code under test, as paths in HERE; not conftest.py (tests' helpers)
TESTS = ["test_*.py", "tests/test_*.py", "course/test_*.py"]
# the names that hold a ddpo.Args in a file ("args" elsewhere is that file's own argparse Namespace); any
# `X.args.FIELD` (self.args, run.args) is one too
ARGS_NAMES = {"evaluate.py": ("run",), "export.py": ("run",)}
DEFAULT_NAMES = ("args", "saved")
# the checks: numeric ranges and choices, a resumed run's refusals of typed flags that would change it
CHECKS = {("plumbing/command_line.py", name) for name in ("range_problem", "complete", "load_run_args", "parse_args")}
DERIVED = {"prompts", "lora_rank", "run_name"}  # complete() fills these in when left at their placeholder

EQUIVALENT = {
    "device": "Args().device is the device this machine runs on (cpu on a CPU-only machine, where every other "
              "value is refused by the checks, which are left unchanged); the tests run on that one device",
}


def files():
    return sorted(str(p.relative_to(HERE)) for glob in CODE for p in HERE.glob(glob)
                  if not p.name.startswith("test_") and p.name != "conftest.py")


def defaults():
    """{field: repr of its default}: dataclasses' default, or Args()'s value where it is computed at import."""
    if str(HERE) not in sys.path:  # run as tests/flag_mutants.py or from tests/mutation_check.py
        sys.path.insert(0, str(HERE))
    import ddpo

    made = ddpo.Args()
    return {f.name: repr(getattr(made, f.name)) for f in dataclasses.fields(ddpo.Args)}


def _functions(tree):
    """(start line, end line, name) of every function, innermost found by the smallest span."""
    return [(n.lineno, n.end_lineno, n.name) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def reads(file, text, fields):
    """{field: [(line, col, end_line, end_col, kind)]} of the reads of the Args fields in this file's text; kind is
    'attr' (X.FIELD) or a getattr(X, expr) whose name is computed ('getattr'), with its name expression's source."""
    tree = ast.parse(text)
    names = ARGS_NAMES.get(file, DEFAULT_NAMES)
    spans = _functions(tree)

    def function_of(line):
        inside = [s for s in spans if s[0] <= line <= s[1]]
        return min(inside, key=lambda s: s[1] - s[0])[2] if inside else None

    def holds_args(node):
        return (isinstance(node, ast.Name) and node.id in names) or (isinstance(node, ast.Attribute) and node.attr == "args")

    def left_alone(field, line):  # a derived setting changes only where complete() takes it; others but in the checks
        where = (file, function_of(line))
        return where != ("plumbing/command_line.py", "complete") if field in DERIVED else where in CHECKS

    found = {f: [] for f in fields}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in found and holds_args(node.value):
            which, kind = [node.attr], ("attr", None)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) == 2 and holds_args(node.args[0])):
            key = node.args[1]
            if isinstance(key, ast.Constant):  # getattr(args, "eta") is args.eta
                which, kind = [key.value] if key.value in found else [], ("attr", None)
            else:  # getattr(args, k): reads whichever field k names
                which, kind = list(found), ("getattr", ast.get_source_segment(text, key))
        else:
            continue
        for f in which:
            if not left_alone(f, node.lineno):
                found[f].append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, *kind))
    return found


def mutate(text, places, field, default):
    """text with each read replaced by (default); a computed getattr name reads the default for this field only."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    # ast's columns count UTF-8 bytes: map them to characters on their line
    def offset(line, col):
        return starts[line - 1] + len(lines[line - 1].encode()[:col].decode())

    out = text
    for line, col, end_line, end_col, kind, key in sorted(places, reverse=True):
        a, b = offset(line, col), offset(end_line, end_col)
        new = f"({default})" if kind == "attr" else f"({default} if {key} == {field!r} else {out[a:b]})"
        out = out[:a] + new + out[b:]
    return out


def flag(field):
    return "--" + field.replace("_", "-")


# tests of refusals: the checks stay unchanged in a flag mutant, so these rarely catch one and go last
REFUSAL_TEST = re.compile(r"refuse|one_line|one_clear_line|bad_input|bad_setup|_error")


def tests_for(field):
    """The tests that set this field, as node ids: those whose own text (with decorators) does, the most mentions
    first; then those that call a module-level helper of their file that does (small_args, one_round, ...); tests of
    refusals last (pytest -x stops at the first failure, so a caught mutant runs few tests)."""
    pattern = re.compile(rf"{re.escape(flag(field))}(?![\w-])|\b{field}\s*=(?!=)|[\"']{field}[\"']")
    ranked = []
    for path in sorted(p for glob in TESTS for p in HERE.glob(glob)):
        text = path.read_text()
        lines = text.splitlines(keepends=True)
        functions = [node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)]

        def source(node):
            return "".join(lines[min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1:node.end_lineno])

        helpers = [node.name for node in functions if not node.name.startswith("test_") and pattern.search(source(node))]
        calls = re.compile(rf"\b({'|'.join(helpers)})\(") if helpers else None
        for node in functions:
            if node.name.startswith("test_"):
                direct = len(pattern.findall(source(node)))
                if direct or (calls and calls.search(source(node))):
                    ranked.append((bool(REFUSAL_TEST.search(node.name)), not direct, -direct, f"{path.relative_to(HERE)}::{node.name}"))
    return [test for *_, test in sorted(ranked, key=lambda r: r[:3])]


def generate():
    """[(name, {file: mutated text}, [tests])] for every field not in EQUIVALENT; a field without reads gets no
    files and a field without tests no tests (flag_mutant_edits reports both)."""
    values = defaults()
    texts = {f: (HERE / f).read_text() for f in files()}
    found = {f: reads(f, t, values) for f, t in texts.items()}
    mutants = []
    for field, default in values.items():
        if field in EQUIVALENT:
            continue
        edits = {f: mutate(texts[f], found[f][field], field, default) for f in texts if found[f][field]}
        mutants.append((f"flag {flag(field)} read as its default {default}", edits, tests_for(field)))
    return mutants


def flag_mutant_edits(name, edits, tests):
    """(edits, None) for a flag mutant that can run, or (None, why not) as mutation_check's verdict."""
    if not edits:
        return None, "MISSED: no code reads this flag (a dead flag, or read in a way this generator does not find)"
    if not tests:
        return None, "MISSED: no test sets this flag (to a value other than its default, a test must)"
    for file, text in edits.items():
        try:
            compile(text, file, "exec")
        except SyntaxError as e:
            return None, f"NOT APPLIED: {file} does not compile with the default in place ({e})"
    return edits, None


if __name__ == "__main__":
    values = defaults()
    texts = {f: (HERE / f).read_text() for f in files()}
    found = {f: reads(f, t, values) for f, t in texts.items()}
    for field in values:
        where = ", ".join(f"{f} {len(found[f][field])}" for f in texts if found[f][field]) or "NO READS"
        if field in EQUIVALENT:
            print(f"{flag(field)}: equivalent ({EQUIVALENT[field]})")
            continue
        tests = tests_for(field)
        print(f"{flag(field)} -> {values[field]}: reads in {where}; {len(tests)} tests: {', '.join(tests) or 'NONE'}")

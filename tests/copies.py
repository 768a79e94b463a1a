"""The marked copies, kept identical to their source (as diffusers keeps its `# Copied from` blocks with
`make fix-copies`).

Each method file stays self-contained, so its plumbing is copied. A line `# Copied from SOURCE: name` right above a
top-level `def` or `class` marks that definition (decorators included) as a copy of the top-level definition `name`
in SOURCE (a path from the repository root, e.g. dmd.py).

  python tests/copies.py           # list the copies that differ from their source, each with a diff; exit 1 if any
  python tests/copies.py --fix     # rewrite every such copy from its source, then list what it rewrote

Edit the source, then run --fix: dmd.py's helpers reach add.py, teacher.py and the tools in one command.
tests/test_copies.py runs the check (and tests/test_add.py counts the copies of each file).
"""
import argparse
import ast
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"^# Copied from (\S+): (\w+)\s*$")
FILES = ("*.py", "benchmark/*.py")   # where copies live (from the repository root)


def definitions(text):
    """{name: (first line, last line)} of a module's top-level defs and classes, 1-based, decorators included."""
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = (first, node.end_lineno)
    return out


def copies(root, path):
    """The marked copies in root/path: [(mark's line, source path, name, (first, last) line of the copy or None)]."""
    with open(os.path.join(root, path), encoding="utf-8") as f:
        text = f.read()
    defs = {first: (name, (first, last)) for name, (first, last) in definitions(text).items()}
    found = []
    for i, line in enumerate(text.splitlines(), 1):
        m = MARK.match(line)
        if m:
            name, span = defs.get(i + 1, (None, None))
            found.append((i, m.group(1), m.group(2), span if name == m.group(2) else None))
    return found


def files(root):
    import glob
    return sorted(os.path.relpath(p, root) for pattern in FILES for p in glob.glob(os.path.join(root, pattern)))


def check(root=ROOT, fix=False, only=None):
    """Every marked copy under root (or in the file `only`) against its source. -> a list of problems, each a text
    that names the file, the line and the block (with a unified diff where the copy differs). fix=True rewrites the
    differing copies from their source first (a file at a time, from the bottom up) and returns what it rewrote."""
    problems, sources = [], {}
    for path in ([only] if only else files(root)):
        found = copies(root, path)
        if not found:
            continue
        with open(os.path.join(root, path), encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        changed = False
        for mark_line, source, name, span in reversed(found):
            where = f"{path}:{mark_line}: copy of {source}: {name}"
            if source not in sources:   # (its lines, its definitions), read once
                try:
                    with open(os.path.join(root, source), encoding="utf-8") as f:
                        text = f.read()
                    sources[source] = text.splitlines(keepends=True), definitions(text)
                except OSError:
                    problems.append(f"{where}: no such source file {source}")
                    continue
            src_lines, src_defs = sources[source]
            if name not in src_defs:
                problems.append(f"{where}: {source} has no top-level definition {name}")
                continue
            if span is None:
                problems.append(f"{where}: the mark is not followed by a top-level definition named {name}")
                continue
            want = src_lines[src_defs[name][0] - 1:src_defs[name][1]]
            have = lines[span[0] - 1:span[1]]
            if have == want:
                continue
            diff = "".join(difflib.unified_diff(want, have, f"{source}: {name} (source)", f"{path}: {name} (copy)"))
            problems.append(f"{where} differs" + (" (rewritten)" if fix else "") + f":\n{diff}")
            if fix:
                lines[span[0] - 1:span[1]] = want
                changed = True
        if changed:
            with open(os.path.join(root, path), "w", encoding="utf-8") as f:
                f.writelines(lines)
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--fix", action="store_true", help="rewrite every copy that differs from its source")
    p.add_argument("--root", default=ROOT, help="the repository root")
    args = p.parse_args(argv)
    problems = check(args.root, args.fix)
    for text in problems:
        print(text)
    if args.fix:
        left = check(args.root)
        print(f"{len(problems) - len(left)} copies rewritten" + (f"; {len(left)} problems left" if left else ""))
        return 1 if left else 0
    n = sum(len(copies(args.root, f)) for f in files(args.root))
    print(f"{n} marked copies, {len(problems)} differ from their source" if problems else
          f"{n} marked copies, all identical to their source")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""How easy is the package to live in? The numbers issue 18 asks for, read from the source with `ast` only.

    .venv/bin/python tools/code_metrics.py [--root sdkit] [--top 5] [--check]

Prints (a) the longest functions and (b) the longest files, in lines of code (docstrings, blank lines and
comment-only lines do not count); (c) import cycles between the package's modules, module-level and
function-level imports alike; (d) private names (`_name`, not dunders) imported from another module of the
package, or read as its attribute (`keys._name`); (e) the functions that write the classifier-free guidance
formula `u + s * (c - u)`.

Exits 0, so it can be read as a report; with --check it exits 1 when a limit is broken: a function over
80 lines of code, a file over 500, a module cycle, a private cross-import, or the guidance formula written in
any number of functions other than one.
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import re
import sys
import tokenize
from dataclasses import dataclass, field

MAX_FUNCTION_LOC = 80
MAX_FILE_LOC = 500

_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENCODING, tokenize.ENDMARKER}


@dataclass
class SourceFile:
    """One parsed module: its dotted name, its tree, and which of its lines hold code."""
    path: str
    module: str
    is_package: bool            # an __init__.py: its module name is the package's
    tree: ast.Module
    raw_lines: int
    code_lines: set[int] = field(default_factory=set)

    @property
    def loc(self) -> int:
        return len(self.code_lines)


@dataclass
class Function:
    qualname: str
    path: str
    lineno: int
    loc: int


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers taken by the docstrings of the module, its classes and its functions."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str, tree: ast.AST) -> set[int]:
    """Lines that hold at least one token of code; a multi-line string counts on every line it spans
    unless it is a docstring."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines - docstring_lines(tree)


def module_name(root: str, path: str) -> tuple[str, bool]:
    """`sdkit/nn/text.py` -> ("sdkit.nn.text", False); `sdkit/nn/__init__.py` -> ("sdkit.nn", True)."""
    rel = os.path.relpath(path, os.path.dirname(os.path.abspath(root)))
    parts = rel[:-len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def read_tree(root: str) -> list[SourceFile]:
    """Every .py file below root (the package folder), parsed."""
    files = []
    root = os.path.abspath(root)
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source, filename=path)
            module, is_package = module_name(root, path)
            files.append(SourceFile(os.path.relpath(path, os.path.dirname(root)), module, is_package, tree,
                                    len(source.splitlines()), code_lines(source, tree)))
    return files


# --- (a) functions and (b) files ---------------------------------------------------------------------------

def scoped(tree: ast.AST):
    """Every node with the qualified name of the function it stands in (None at module level); a function's
    own node comes with its own name: `Class.method`, `outer.<locals>.inner`."""
    def visit(node: ast.AST, prefix: str, current: str | None):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = prefix + child.name
                yield child, qualname
                yield from visit(child, qualname + ".<locals>.", qualname)
            elif isinstance(child, ast.ClassDef):
                yield child, current
                yield from visit(child, prefix + child.name + ".", current)
            else:
                yield child, current
                yield from visit(child, prefix, current)

    yield from visit(tree, "", None)


def functions(files: list[SourceFile]) -> list[Function]:
    """Every function and method, nested ones too, longest first. A function's lines include those of the
    functions nested in it."""
    found = []
    for file in files:
        for node, qualname in scoped(file.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = range(node.lineno, node.end_lineno + 1)
                found.append(Function(qualname, file.path, node.lineno, sum(n in file.code_lines for n in span)))
    return sorted(found, key=lambda f: (-f.loc, f.path, f.lineno))


# --- (c) import cycles and (d) private cross-imports -------------------------------------------------------

@dataclass
class Import:
    importer: str               # the module that imports
    target: str                 # the package module it imports (a module or a package)
    names: tuple[str, ...]      # the names taken from target by `from target import ...`
    lineno: int


def resolve_base(file: SourceFile, node: ast.ImportFrom) -> str:
    """The absolute module of a `from ... import`: relative levels count up from the importer's package."""
    if node.level == 0:
        return node.module or ""
    package = file.module.split(".") if file.is_package else file.module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(files: list[SourceFile]) -> list[Import]:
    """Every import of a package module, at module level or inside functions. `from pkg import sub` where
    `sub` is a submodule is an import of `pkg.sub`."""
    modules = {f.module for f in files}
    found = []
    for file in files:
        for node in ast.walk(file.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        found.append(Import(file.module, alias.name, (), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = resolve_base(file, node)
                plain = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        found.append(Import(file.module, sub, (), node.lineno))
                    else:
                        plain.append(alias.name)
                if plain and base in modules:
                    found.append(Import(file.module, base, tuple(plain), node.lineno))
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (a module importing itself is not a cycle)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def import_cycles(files: list[SourceFile], found: list[Import]) -> tuple[list[list[str]], list[list[str]]]:
    """(module cycles, cycles through a package __init__). A package's __init__ importing its own submodules
    (to re-export them) is how packages are built; a cycle that goes away without those edges is listed
    apart. Every other cycle is a real one between modules."""
    packages = {f.module for f in files if f.is_package}
    graph: dict[str, set[str]] = {f.module: set() for f in files}
    for imp in found:
        if imp.target != imp.importer:
            graph[imp.importer].add(imp.target)

    def own_submodule(importer: str, target: str) -> bool:
        return importer in packages and target.startswith(importer + ".")

    strict = {v: {w for w in ws if not own_submodule(v, w)} for v, ws in graph.items()}
    real = strongly_connected(strict)
    through_init = [c for c in strongly_connected(graph) if not any(set(r) >= set(c) for r in real)]
    return real, through_init


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(found: list[Import]) -> list[tuple[Import, str]]:
    """`from other_module import _name`: a name its module kept to itself, borrowed by another one."""
    return [(imp, name) for imp in found if imp.target != imp.importer for name in imp.names if is_private(name)]


def private_attributes(files: list[SourceFile]) -> list[Import]:
    """`keys._name` where `keys` is another package module bound by `from . import keys` or `import x.y as keys`:
    the same borrowing as a private import, written as an attribute."""
    modules = {f.module for f in files}
    found = []
    for file in files:
        bound = {}  # local name -> package module, wherever in the file it is bound
        for node in ast.walk(file.tree):
            if isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
            elif isinstance(node, ast.ImportFrom):
                base = resolve_base(file, node)
                bound.update({a.asname or a.name: f"{base}.{a.name}" for a in node.names
                              if f"{base}.{a.name}" in modules})
        for node in ast.walk(file.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and is_private(node.attr)
                    and bound.get(node.value.id, file.module) != file.module):
                found.append(Import(file.module, bound[node.value.id], (node.attr,), node.lineno))
    return sorted(found, key=lambda use: (use.importer, use.lineno))


# --- (e) classifier-free guidance -----------------------------------------------------------------------

GUIDANCE_NAME = re.compile(r"cond|eps|guid|cfg|(^|_)[uc]$", re.IGNORECASE)


def interpolation(node: ast.AST) -> tuple[ast.AST, ast.AST] | None:
    """(u, c) when node is `u + s * (c - u)` or `u + (c - u) * s`: the same expression added and subtracted."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
            and isinstance(node.right, ast.BinOp) and isinstance(node.right.op, ast.Mult)):
        return None
    for factor in (node.right.left, node.right.right):
        if (isinstance(factor, ast.BinOp) and isinstance(factor.op, ast.Sub)
                and ast.dump(factor.right) == ast.dump(node.left)):
            return node.left, factor.left
    return None


def is_guidance(u: ast.AST, c: ast.AST) -> bool:
    """Guidance is an interpolation (a lerp) between model outputs; plain lerps (of sigmas, of stroke
    points, of a range) have the same shape. The outputs are told by their names: `eps_uncond`, `cond`,
    `e_u` / `e_c`, anything with `cond`, `eps`, `guid` or `cfg` in it."""
    nodes = [n for operand in (u, c) for n in ast.walk(operand)]
    names = [n.id for n in nodes if isinstance(n, ast.Name)] + [n.attr for n in nodes if isinstance(n, ast.Attribute)]
    return any(GUIDANCE_NAME.search(name) for name in names)


def interpolations(files: list[SourceFile]) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(guidance, other lerps): (qualified function name, file, first line) of each function that writes the
    formula in its own body, not only in a function nested in it; code outside functions is <module>."""
    found: dict[tuple[str, str], tuple[int, bool]] = {}
    for file in files:
        for node, qualname in scoped(file.tree):
            operands = interpolation(node)
            if operands:
                key = (qualname or "<module>", file.path)
                lineno, guidance = found.get(key, (node.lineno, False))
                found[key] = (lineno, guidance or is_guidance(*operands))
    guidance = [(name, path, line) for (name, path), (line, g) in found.items() if g]
    lerps = [(name, path, line) for (name, path), (line, g) in found.items() if not g]
    return guidance, lerps


# --- report -----------------------------------------------------------------------------------------------

def report(root: str, top: int = 5, out=sys.stdout) -> list[str]:
    """Print the five sections; return the limits that are broken (empty when all hold)."""
    files = read_tree(root)
    funcs = functions(files)
    found = imports(files)
    real, through_init = import_cycles(files, found)
    private = private_imports(found) + [(use, use.names[0]) for use in private_attributes(files)]
    guidance, lerps = interpolations(files)
    p = lambda *a: print(*a, file=out)  # noqa: E731

    p(f"code metrics of {root}: {len(files)} files, {sum(f.loc for f in files)} lines of code")
    p(f"\n(a) longest functions (lines of code, docstring excluded; limit {MAX_FUNCTION_LOC}):")
    for f in funcs[:top]:
        p(f"  {f.loc:5d}  {f.qualname}  ({f.path}:{f.lineno})")
    over = [f for f in funcs if f.loc > MAX_FUNCTION_LOC]
    p(f"  functions over the limit: {len(over)} of {len(funcs)}")

    p(f"\n(b) longest files (lines of code / raw lines; limit {MAX_FILE_LOC}):")
    by_size = sorted(files, key=lambda f: (-f.loc, f.path))
    for f in by_size[:top]:
        p(f"  {f.loc:5d} / {f.raw_lines:5d}  {f.path}")
    big = [f for f in files if f.loc > MAX_FILE_LOC]
    p(f"  files over the limit: {len(big)} of {len(files)}")

    p("\n(c) import cycles (module-level and function-level imports):")
    p(f"  between modules: {len(real)}")
    for c in real:
        p("    " + " <-> ".join(c))
    p(f"  through a package __init__ that imports its own submodules (normal, listed for reference): "
      f"{len(through_init)}")
    for c in through_init:
        p("    " + " <-> ".join(c))

    p(f"\n(d) private names imported across modules (or used as another module's attribute): {len(private)}")
    for imp, name in private:
        p(f"    {name}: {imp.target} -> {imp.importer} (line {imp.lineno})")

    p(f"\n(e) functions that write the guidance formula u + s * (c - u): {len(guidance)}")
    for name, path, lineno in guidance:
        p(f"    {name}  ({path}:{lineno})")
    p(f"  the same shape, not guidance (plain interpolations, not counted): {len(lerps)}")
    for name, path, lineno in lerps:
        p(f"    {name}  ({path}:{lineno})")

    broken = []
    if over:
        broken.append(f"{len(over)} functions over {MAX_FUNCTION_LOC} lines of code")
    if big:
        broken.append(f"{len(big)} files over {MAX_FILE_LOC} lines of code")
    if real:
        broken.append(f"{len(real)} import cycles")
    if private:
        broken.append(f"{len(private)} private cross-module imports")
    if len(guidance) != 1:
        broken.append(f"guidance formula in {len(guidance)} functions, not 1")
    p("\nlimits: " + ("all hold" if not broken else "broken: " + "; ".join(broken)))
    return broken


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--root", default=os.path.join(here, "sdkit"), help="the package folder to measure")
    parser.add_argument("--top", type=int, default=5, help="how many functions and files to list")
    parser.add_argument("--check", action="store_true", help="exit 1 when a limit is broken")
    args = parser.parse_args(argv)
    broken = report(args.root, args.top)
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    sys.exit(main())

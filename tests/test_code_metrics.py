"""tools/code_metrics.py on tiny package trees whose numbers are known by construction."""
import importlib.util
import io
import os
import sys
import textwrap

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools", "code_metrics.py")
_spec = importlib.util.spec_from_file_location("code_metrics", _PATH)
metrics = sys.modules["code_metrics"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up
_spec.loader.exec_module(metrics)


def write_package(tmp_path, files: dict[str, str]) -> str:
    root = tmp_path / "pkg"
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return str(root)


@pytest.fixture
def package(tmp_path):
    return write_package(tmp_path, {
        "__init__.py": """\
            from .a import f
            """,
        "a.py": '''\
            """Module docstring: not code."""
            from pkg.b import g


            def f(x):
                """A docstring
                of three lines
                that does not count."""
                # a comment line does not count

                y = x + 1  # a trailing comment: code
                text = """a multi-line string
                that is not a docstring counts"""
                return y + len(text)
            ''',
        "b.py": """\
            def g():
                from . import a            # function-level import: closes the cycle a -> b -> a
                return a.f(1)
            """,
        "sub/__init__.py": """\
            from .c import _helper, public
            """,
        "sub/c.py": """\
            def _helper():
                return 1


            def public():
                return 2


            def guide(eps_uncond, eps_cond, scale):
                return eps_uncond + scale * (eps_cond - eps_uncond)


            def lerp(lo, hi, t):
                return lo + (hi - lo) * t
            """,
        "sub/d.py": """\
            from pkg.sub.c import _helper
            from ..a import f
            import pkg.sub as sub
            from . import c


            def borrow():
                return c._helper() + sub._private + c.public()


            class Sampler:
                def combine(self, u, c, s):
                    return u + (c - u) * s
            """,
    })


def test_lines_of_code_leave_out_docstrings_comments_and_blank_lines(package):
    files = metrics.read_tree(package)
    by_name = {f.qualname: f for f in metrics.functions(files)}
    # def, y = ..., text = (2 lines of string), return
    assert by_name["f"].loc == 5
    assert by_name["Sampler.combine"].loc == 2
    a = next(f for f in files if f.module == "pkg.a")
    assert a.raw_lines == 14 and a.loc == 6      # the import and the function


def test_relative_and_function_level_imports_are_resolved(package):
    found = {(i.importer, i.target) for i in metrics.imports(metrics.read_tree(package))}
    assert ("pkg.b", "pkg.a") in found               # `from . import a` inside a function is pkg.a
    assert ("pkg.sub.d", "pkg.a") in found           # `from ..a import f`
    assert ("pkg.sub.d", "pkg.sub") in found         # `import pkg.sub`
    assert ("pkg.sub", "pkg.sub.c") in found


def test_cycles_between_modules_are_told_from_package_reexports(package):
    files = metrics.read_tree(package)
    real, through_init = metrics.import_cycles(files, metrics.imports(files))
    assert real == [["pkg.a", "pkg.b"]]
    # pkg.sub re-exports pkg.sub.c, which pkg.sub.d reaches through pkg.sub: no cycle at all
    assert through_init == []


def test_a_submodule_importing_its_reexporting_init_is_listed_apart(tmp_path):
    root = write_package(tmp_path, {"__init__.py": "from . import c, e\n", "c.py": "x = 1\n",
                                    "e.py": "import pkg\n"})
    files = metrics.read_tree(root)
    real, through_init = metrics.import_cycles(files, metrics.imports(files))
    assert real == [] and through_init == [["pkg", "pkg.e"]]


def test_private_names_imported_from_another_module(package):
    private = metrics.private_imports(metrics.imports(metrics.read_tree(package)))
    assert sorted((imp.importer, imp.target, name) for imp, name in private) == [
        ("pkg.sub", "pkg.sub.c", "_helper"), ("pkg.sub.d", "pkg.sub.c", "_helper")]


def test_private_names_read_as_another_module_s_attribute(package):
    uses = metrics.private_attributes(metrics.read_tree(package))
    assert sorted((u.importer, u.target, u.names) for u in uses) == [
        ("pkg.sub.d", "pkg.sub", ("_private",)), ("pkg.sub.d", "pkg.sub.c", ("_helper",))]


def test_guidance_formula_is_found_in_both_orders_and_told_from_a_lerp(package):
    guidance, lerps = metrics.interpolations(metrics.read_tree(package))
    assert sorted(name for name, _, _ in guidance) == ["Sampler.combine", "guide"]
    assert [name for name, _, _ in lerps] == ["lerp"]


def test_check_fails_on_a_broken_limit_and_passes_on_a_clean_tree(tmp_path, package):
    out = io.StringIO()
    broken = metrics.report(package, out=out)
    assert "1 import cycles" in "; ".join(broken) and "guidance formula in 2 functions" in "; ".join(broken)
    assert metrics.main(["--root", package]) == 0            # a report, not a verdict, without --check
    assert metrics.main(["--root", package, "--check"]) == 1

    clean = write_package(tmp_path / "clean", {
        "__init__.py": "from .guide import combine\n",
        "guide.py": "def combine(uncond, cond, s):\n    return uncond + s * (cond - uncond)\n",
    })
    assert metrics.report(clean, out=io.StringIO()) == []
    long_body = "def long():\n" + "".join(f"    x{i} = {i}\n" for i in range(metrics.MAX_FUNCTION_LOC + 1))
    (tmp_path / "clean" / "pkg" / "long.py").write_text(long_body)
    assert metrics.report(clean, out=io.StringIO()) == [f"1 functions over {metrics.MAX_FUNCTION_LOC} lines of code"]

"""The API reference: every public function has a docstring, and the Sphinx build passes with warnings as errors.

* :func:`missing_docstrings` walks every public module of ``gradjax`` (no Sphinx needed): a public function,
  class, method or property defined there without a docstring is reported.
* ``sphinx-build -W --keep-going -b html docs/api <tmp>`` must succeed: a docstring RST error, a broken
  cross-reference (``nitpicky``) or a missing docstring (``docs/api/_ext/gradjax_docs_check.py``) fails it.
  Skipped, with the reason, only when Sphinx / myst-nb are not installed (``pip install -e ".[docs]"``; CI
  installs them).
* The failure cases are demonstrated on a synthetic module and project.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "api")
EXT = os.path.join(DOCS, "_ext")
PROTOCOL_METHODS = {"tree_flatten", "tree_unflatten"}


def _load_public_api():
    """``docs/api/public_api.py``, the generator of the public-API page (it also defines which modules are public)."""
    spec = importlib.util.spec_from_file_location("gradjax_public_api", os.path.join(DOCS, "public_api.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PUBLIC_API = _load_public_api()
public_modules = PUBLIC_API.public_modules  # ``gradjax`` and every submodule with no ``_``-prefixed part


def _has_doc(obj) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())


def missing_docstrings(module: types.ModuleType) -> list[str]:
    """Public objects defined in ``module`` without a docstring: the module itself, functions, classes, and the
    public methods / properties those classes define (pytree protocol methods and callables that are not
    gradjax code, such as a Flax initializer field, are exempt)."""
    missing = [] if (module.__doc__ or "").strip() else [module.__name__]
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) and not _has_doc(obj):
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj):
            if not (obj.__doc__ or "").strip():
                missing.append(f"{module.__name__}.{name}")
            for attr, member in vars(obj).items():
                if attr.startswith("_") or attr in PROTOCOL_METHODS:
                    continue
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                fn = fn.fget if isinstance(fn, property) else fn
                if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not (fn.__doc__ or "").strip():
                    missing.append(f"{module.__name__}.{name}.{attr}")
    return missing


def test_every_public_function_has_a_docstring():
    missing = [m for name in public_modules() for m in missing_docstrings(importlib.import_module(name))]
    assert not missing, "public objects without a docstring:\n  " + "\n  ".join(missing)


def test_missing_docstring_is_detected():
    """The checker flags an undocumented public function, method and property, and nothing private."""
    mod = types.ModuleType("synthetic_mod", "A module.")
    exec(textwrap.dedent('''
        def documented():
            """Has one."""
        def undocumented():
            pass
        def _private():
            pass
        class Thing:
            """A class."""
            def method(self):
                pass
            @property
            def prop(self):
                return 1
            def tree_flatten(self):
                pass
    '''), mod.__dict__)
    assert missing_docstrings(mod) == ["synthetic_mod.undocumented", "synthetic_mod.Thing.method",
                                       "synthetic_mod.Thing.prop"]


def _sphinx_available():
    for name in ("sphinx", "myst_nb"):
        try:
            importlib.import_module(name)
        except ImportError:
            return f"{name} is not installed: pip install -e '.[docs]' (CI installs it)"
    return None


def sphinx_build(srcdir: str, outdir: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m sphinx -W --keep-going -b html srcdir outdir`` (doctrees inside ``outdir``)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", os.path.join(outdir, ".doctrees"), srcdir, outdir],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.skipif(_sphinx_available() is not None, reason=str(_sphinx_available()))
def test_api_reference_builds_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = sphinx_build(DOCS, str(out))
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
    pages = {p.name for p in (out / "_autosummary").iterdir()}
    for module in public_modules():
        assert f"{module}.html" in pages, f"no API page for {module}"
    for nb in ("01_quickstart", "02_train_gradient_objective", "03_hessian_traces"):
        assert (out / "notebooks" / f"{nb}.html").exists()
    trace_page = (out / "_autosummary" / "gradjax.trace.html").read_text()
    assert "hutchinson_trace" in trace_page and "taylor_trace" in trace_page


SYNTHETIC_CONF = f"""
import sys
sys.path.insert(0, {EXT!r})
sys.path.insert(0, __import__("os").path.dirname(__file__))
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "gradjax_docs_check"]
nitpicky = True
autodoc_default_options = {{"members": True, "undoc-members": True}}
"""
SYNTHETIC_MODULE = {
    "clean": 'def f(x):\n    """Documented; see :func:`g`."""\n\n\ndef g(x):\n    """Also documented."""\n',
    "missing_docstring": 'def f(x):\n    """Documented."""\n\n\ndef g(x):\n    return x\n',
    "broken_reference": 'def f(x):\n    """See :func:`no_such_function`."""\n',
}


@pytest.mark.skipif(_sphinx_available() is not None, reason=str(_sphinx_available()))
@pytest.mark.parametrize("case", sorted(SYNTHETIC_MODULE))
def test_docs_build_fails_on_missing_docstring_or_broken_reference(case, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(SYNTHETIC_CONF)
    modname = f"synthetic_{case}"
    (src / f"{modname}.py").write_text(f'"""A synthetic module."""\n{SYNTHETIC_MODULE[case]}')
    (src / "index.rst").write_text(f"Synthetic\n=========\n\n.. automodule:: {modname}\n")
    proc = sphinx_build(str(src), str(tmp_path / "out"), timeout=300)
    log = proc.stdout + proc.stderr
    if case == "clean":
        assert proc.returncode == 0, log
    elif case == "missing_docstring":
        assert proc.returncode != 0 and f"missing docstring: public function {modname}.g" in log, log
    else:
        assert proc.returncode != 0 and "reference target not found: no_such_function" in log, log


def test_public_api_page_matches_the_code():
    """``docs/api/public_api.rst`` (the public API in one place) is what ``docs/api/public_api.py`` generates now."""
    with open(os.path.join(DOCS, "public_api.rst"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == PUBLIC_API.render(), ("docs/api/public_api.rst is stale: "
                                              "python docs/api/public_api.py > docs/api/public_api.rst")
    for name in ("full_gradients", "hutchinson_trace", "make_loss_fn", "jit_train_step", "input_agnostic"):
        assert f":py:func:`{name}`" in committed

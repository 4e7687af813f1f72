"""Sphinx extension for gradjax's API reference: docstring checks and short cross-references.

* **Missing docstrings fail the build.** autodoc reports every object it documents through
  ``autodoc-process-docstring`` (``undoc-members`` is on, so undocumented members are documented too, with empty
  ``lines``). A public module, function, class, exception, method or property with an empty docstring is logged as
  a warning (``gradjax.missing-docstring``), which ``sphinx-build -W`` turns into a failure. Names starting with
  ``_`` are private and exempt; so are data attributes.
* **Imported and re-exported names resolve.** Docstrings write ``:class:`ModelHandle``` or
  ``:func:`gradjax.losses.make_loss_fn``` for names a module imports or re-exports; each object is documented once,
  under its defining module. When the Python domain finds no target, the reference is resolved to the object the
  name denotes (looked up by import), or else to the one documented object whose full name ends in ``.<name>``
  (``PREDICTED`` -> ``gradjax.gradients.PREDICTED``); otherwise it stays broken and ``nitpicky`` reports it.
* **Attribute docstrings are prose.** napoleon reads the first line of an attribute's docstring as
  ``type: description``; gradjax writes prose there ("Named fills for removed pixels: ..."), so napoleon is not
  applied to attribute, data and property docstrings.
* Callables that are not gradjax code (a Flax ``kernel_init`` field holding an initializer) and the pytree
  protocol methods (``tree_flatten``/``tree_unflatten``) are left out of class pages.
"""
from __future__ import annotations

import inspect

from sphinx.util import logging

logger = logging.getLogger(__name__)

CHECKED = frozenset({"module", "function", "class", "exception", "method", "classmethod", "staticmethod",
                     "property"})
PROTOCOL_METHODS = frozenset({"tree_flatten", "tree_unflatten"})


def check_docstring(app, what, name, obj, options, lines):
    """Warn (``gradjax.missing-docstring``) when a public object has an empty docstring."""
    if what not in CHECKED:
        return
    short = name.rsplit(".", 1)[-1]
    if short.startswith("_") and what != "module":
        return
    if any(line.strip() for line in lines):
        return
    logger.warning("missing docstring: public %s %s", what, name, type="gradjax", subtype="missing-docstring",
                   location=name)


def skip_foreign_members(app, what, name, obj, skip, options):
    """Leave callables defined outside gradjax and pytree protocol methods out of class pages."""
    if what != "class":
        return None
    if name in PROTOCOL_METHODS:
        return True
    target = obj.fget if isinstance(obj, property) else inspect.unwrap(obj) if callable(obj) else None
    module = getattr(target, "__module__", None) if target is not None else None
    if callable(obj) and not isinstance(obj, type) and module and not module.startswith("gradjax"):
        return True
    return None


def _canonical_name(target: str, module: str | None) -> str | None:
    """The defining module's name of the object ``target`` names (``module.target`` or the dotted ``target``)."""
    import importlib

    for base in ([module] if module else []) + [None]:
        path = f"{base}.{target}" if base else target
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except Exception:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
            if isinstance(mod, str) and isinstance(qual, str) and "<" not in qual:
                return f"{mod}.{qual}"
            break
    return None


def resolve_reexported(app, env, node, contnode):
    """``missing-reference``: resolve a Python reference to a re-exported or imported gradjax object.

    First the object the name denotes (in the current module, or as a dotted path) is looked up by import and
    referenced under its defining module (``gradjax.models.VGG`` -> ``gradjax.models.vgg.VGG``); failing that
    (e.g. for constants), the unique documented object whose full name ends in ``.<target>``. Otherwise the
    reference stays broken."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    if not target:
        return None
    domain = env.get_domain("py")
    canonical = _canonical_name(target, node.get("py:module"))
    if canonical and canonical in domain.objects and canonical != target:
        candidates = [canonical]
    else:
        suffix = "." + target
        candidates = sorted({full for full, entry in domain.objects.items()
                             if full.endswith(suffix) and not getattr(entry, "aliased", False)})
    if len(candidates) != 1:
        return None
    return domain.resolve_xref(env, node.get("refdoc"), app.builder, node.get("reftype"), candidates[0], node,
                               contnode)


def _napoleon_except_attributes(handler):
    def process(app, what, name, obj, options, lines):
        if what in ("attribute", "data", "property"):
            return None  # prose: the first line is not "type: description"
        return handler(app, what, name, obj, options, lines)
    return process


def setup(app):
    """Register the checks and the reference resolver; napoleon leaves attribute docstrings alone."""
    app.setup_extension("sphinx.ext.napoleon")
    from sphinx.ext import napoleon

    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
            app.connect("autodoc-process-docstring", _napoleon_except_attributes(listener.handler),
                        priority=listener.priority)
    app.connect("autodoc-process-docstring", check_docstring, priority=600)
    app.connect("autodoc-skip-member", skip_foreign_members)
    app.connect("missing-reference", resolve_reexported)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

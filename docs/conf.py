import inspect

from sphinx.ext.autodoc.typehints import record_typehints
from sphinx.ext.intersphinx import missing_reference

project = "flask-wfsession"
copyright = "2026, the flask-wfsession developers"
# 7.4: the standard domain's "confval" directive and role (docs/configuration.md).
needs_sphinx = "7.4"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
myst_enable_extensions = ["deflist"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types for the parameters a docstring describes (and the return type): an
# internal field (FakeStep.engines) or a ParamSpec's *args stays out.
autodoc_typehints_description_target = "documented_params"
html_theme = "furo"
html_title = "flask-wfsession"
exclude_patterns = ["_build"]

# The docs build offline (CI has no network): the inventories are in the
# repository, made by _inventories/make.py with only the objects we link to.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", "_inventories/python.inv"),
    "flask": ("https://flask.palletsprojects.com/en/stable/", "_inventories/flask.inv"),
    "sqlalchemy": ("https://docs.sqlalchemy.org/en/20/", "_inventories/sqlalchemy.inv"),
}
nitpick_ignore_regex = [
    # The ParamSpec and TypeVar of the decorators' signatures: nothing to link to.
    ("py:(class|obj)", r"(typing\.)?~?P|flask_wfsession\.\w+\.R"),
]

# Type hints name a class where it is defined; the other projects document it
# under its public name.
PUBLIC_NAMES = {
    "concurrent.futures._base.Executor": "concurrent.futures.Executor",
    "concurrent.futures._base.Future": "concurrent.futures.Future",
    "flask.app.Flask": "flask.Flask",
    "sqlalchemy.engine.base.Engine": "sqlalchemy.engine.Engine",
    "sqlalchemy.orm.session.Session": "sqlalchemy.orm.Session",
    "sqlalchemy.orm.session.sessionmaker": "sqlalchemy.orm.sessionmaker",
}


def link_public_name(app, env, node, contnode):
    """Resolve a type hint's defining-module name through its public name:
    another project's (intersphinx), or ours (``flask_wfsession._x.Name`` is
    documented as ``flask_wfsession.Name``)."""
    target = node.get("reftarget", "")
    if target.startswith("flask_wfsession._"):
        public = "flask_wfsession." + target.rsplit(".", 1)[1]
        domain = env.get_domain("py")
        builder = app.builder
        return domain.resolve_xref(
            env, node["refdoc"], builder, node["reftype"], public, node, contnode
        )
    public = PUBLIC_NAMES.get(target)
    if public is None:
        return None
    node = node.copy()
    node["reftarget"] = public
    return missing_reference(app, env, node, contnode)


def record_init_typehints(app, objtype, name, obj, options, args, retann):
    """Record a class's parameter types from its ``__init__``.

    With ``from __future__ import annotations`` autodoc leaves a class's
    parameter types unresolved (``t.Any``, ``sa.Engine``):
    https://github.com/sphinx-doc/sphinx/issues/11674. Runs after autodoc's
    own recording and resolves them as it does for functions.
    """
    init = getattr(obj, "__init__", None)
    if objtype in {"class", "exception"} and inspect.isfunction(init):
        record_typehints(app, "method", name, init, options, args, retann)
        if hasattr(app.env, "current_document"):  # Sphinx 8.2 and later
            annotations = app.env.current_document.autodoc_annotations
        else:
            annotations = app.env.temp_data["annotations"]
        annotations[name].pop("return", None)  # a class shows no return type


def setup(app):
    app.connect("autodoc-process-signature", record_init_typehints, priority=600)
    app.connect("missing-reference", link_public_name)

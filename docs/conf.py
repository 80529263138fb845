# The docs build offline (CI has no network), so no intersphinx.
project = "flask-wfsession"
copyright = "2026, the flask-wfsession developers"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "furo"
html_title = "flask-wfsession"
exclude_patterns = ["_build"]

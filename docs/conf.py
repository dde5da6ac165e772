"""Sphinx configuration of the marglik documentation (see docs/README.md for the layout).

Sphinx + sphinx-gallery, as curvlinops and BackPACK document themselves: the examples are scripts
executed at build time (their figures are the pages'), the API reference is generated from the
Google-style docstrings (autodoc + napoleon), and MyST lets the Markdown pages include the committed
``results/*.md`` instead of copying them. Build (offline, warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's marglik, also without `pip install -e`
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("WANDB_MODE", "disabled")  # the gallery's tuning runs never log
os.environ.setdefault("MPLBACKEND", "Agg")

import marglik  # noqa: E402

project = "marglik"
author = "the marglik authors"
copyright = "the marglik authors"
version = release = marglik.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args / Returns / Raises
    "myst_parser",  # Markdown pages; {include} of results/*.md
    "sphinx_gallery.gen_gallery",  # docs/examples/*.py, executed at build time
    "marglik_docs",  # CLI reference from the schema; every public name documented
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md", "examples"]  # examples: sphinx-gallery's sources
root_doc = "index"

# MyST: anchors for headings down to ###, so pages link to sections (`page.md#a-heading`)
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]  # no dollarmath: MathJax would need the network

# autodoc / napoleon: members in source order, signatures with their types
autodoc_default_options = {"members": True, "member-order": "bysource"}  # a key present is a flag set
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each attribute

# the public names whose documentation marglik_docs checks (an undocumented one fails the build)
marglik_public_modules = ["marglik", "marglik.tuning", "marglik.tuning.parts"]

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # every plot_*.py runs at build time
    "within_subsection_order": "marglik_docs.ExampleOrder",  # reading order, not alphabetical
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
    "write_computation_times": False,  # its summary page loads tables from a CDN; each page shows its time
    "show_memory": False,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "reset_modules": ("matplotlib", "marglik_docs.reset_torch"),
    "only_warn_on_example_error": False,  # a failing example fails the build
}

html_theme = "furo"
html_title = f"marglik {release}"
html_static_path: list = []
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}

# A name listed under "Attributes:" (napoleon's :ivar:) is looked up as a Python object; a field name
# that several documented classes share (``approx``: KFAC's and CurvatureConfig's) has no single target.
# Only this ambiguity is silenced; a missing reference or page still fails the build.
suppress_warnings = ["ref.python"]

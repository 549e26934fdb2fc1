"""Sphinx configuration of the tensorly_datc documentation.

Build with ``python -m sphinx -W --keep-going -b html doc doc/_build/html`` from the repository
root. The gallery runs every ``examples/plot_*.py`` script during the build.
"""

import sys
from pathlib import Path

DOC_DIR = Path(__file__).resolve().parent
REPO_ROOT = DOC_DIR.parent

# Document the checkout itself, installed or not, and find gallery_arguments.py next to this file.
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(DOC_DIR))

import tensorly_datc  # noqa: E402

project = "tensorly_datc"
author = "the tensorly_datc developers"
copyright = "the tensorly_datc developers"
version = release = tensorly_datc.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# One page per function and class, generated into gen_modules/ (not kept in git).
autosummary_generate = True
autodoc_default_options = {"members": False}
# autosummary lists the methods, so numpydoc's own member tables would repeat them.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# MathJax is loaded from its CDN when a page is viewed. The build itself needs no network.

html_theme = "pydata_sphinx_theme"
html_title = f"tensorly_datc {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = []

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "/plot_",
    # Only the plot_ scripts form the gallery. The others, such as distributed_statistics.py,
    # need a launcher like torchrun and have no gallery title.
    "ignore_pattern": r"(^|[/\\])(?!plot_)[^/\\]+\.py$",
    # Command-line arguments of each example during the build (see gallery_arguments.py).
    "reset_argv": "gallery_arguments.reset_argv",
    "remove_config_comments": True,
    "download_all_examples": False,
}

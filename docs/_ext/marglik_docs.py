"""Sphinx extension of the marglik docs: the CLI reference from the typed schema, and a check that
every public name is documented.

Directives (usable from reST and from MyST pages as ```` ```{marglik-options} ````):

* ``marglik-help`` -- the literal text of ``marglik --help`` (:func:`marglik.cli_config.help_text`);
* ``marglik-report-help`` -- the literal text of ``marglik-report --help``;
* ``marglik-options`` -- one table per config section and per model: every option with its default,
  its meaning (the field's ``#:`` comment) and what it allows, from the same functions that write
  ``--help`` (so the two cannot disagree);
* ``marglik-error-types`` -- every subclass of :class:`marglik.UserError`, with its docstring's first
  line.

The check: when the environment is complete, every name in ``__all__`` of the modules listed in
``marglik_public_modules`` (conf.py) must be an object documented by autodoc (the Python domain
knows it as ``<module>.<name>``) and carry a docstring; otherwise a warning, which ``-W`` turns into
a failed build.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import fields
from typing import Any, List

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.util import logging

logger = logging.getLogger(__name__)


def reset_torch(gallery_conf: Any, fname: str) -> None:
    """sphinx-gallery's reset hook: every example starts from the same torch state, on one thread
    (the examples' models are small; one thread makes their timings comparable between machines and
    keeps a loaded machine from oversubscribing its cores)."""
    import torch

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)


class ExampleOrder:
    """sphinx-gallery's ``within_subsection_order``: the examples in reading order (a toy posterior
    first, the tuning loop last); an example not listed comes after them, by file name."""

    ORDER = ("plot_laplace_toy.py", "plot_marglik_vs_prior.py", "plot_expand_vs_reduce.py",
             "plot_invariance.py", "plot_architecture_selection.py")

    def __init__(self, src_dir: str) -> None:
        self.src_dir = src_dir

    def __call__(self, filename: str) -> "tuple[int, str]":
        name = str(filename).rsplit("/", 1)[-1]
        return (self.ORDER.index(name) if name in self.ORDER else len(self.ORDER), name)


def _table(header: List[str], rows: List[List[Any]], widths: List[int]) -> nodes.table:
    """A docutils table; a cell is a string (text) or a ``("code", text)`` tuple (inline literal)."""
    table = nodes.table(classes=["marglik-options"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for w in widths:
        group += nodes.colspec(colwidth=w)

    def row(cells: List[Any]) -> nodes.row:
        r = nodes.row()
        for cell in cells:
            para = nodes.paragraph()
            if isinstance(cell, tuple):
                para += nodes.literal(text=cell[1])
            else:
                para += nodes.Text(cell)
            r += nodes.entry("", para)
        return r

    head = nodes.thead()
    head += row(header)
    body = nodes.tbody()
    for cells in rows:
        body += row(cells)
    group += head
    group += body
    return table


class HelpDirective(Directive):
    """``marglik --help``, verbatim."""

    has_content = False

    def run(self) -> List[nodes.Node]:
        from marglik.cli_config import help_text

        text = help_text()
        return [nodes.literal_block(text, text, language="text")]


class ReportHelpDirective(Directive):
    """``marglik-report --help``, verbatim (its argparse parser, run as the console script runs it)."""

    has_content = False

    def run(self) -> List[nodes.Node]:
        import contextlib
        import io
        import os

        from marglik.report import main

        out, columns = io.StringIO(), os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width: fix it
        try:
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                main(["--help"])
        finally:
            if columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = columns
        text = out.getvalue().rstrip()
        return [nodes.literal_block(text, text, language="text")]


class OptionsDirective(Directive):
    """Every option of the schema, one table per section and model."""

    has_content = False

    def run(self) -> List[nodes.Node]:
        from marglik.cli_config import field_docs
        from marglik.tuning.config import _SECTIONS, MODEL_SCHEMAS, describe_type, field_type, show_value

        out: List[nodes.Node] = []
        groups = [(name, name, klass) for name, klass in _SECTIONS.items()]
        groups += [(f"model={model}", "model", schema) for model, schema in MODEL_SCHEMAS.items()]
        for title, section, klass in groups:
            docs, default = field_docs(klass), klass()
            rows = []
            for f in fields(klass):
                if section == "model" and f.name == "name":
                    continue
                meaning = re.sub(r"\bNone\b", "null", docs.get(f.name, ""))  # as on the command line (--help)
                rows.append([("code", f"{section}.{f.name}"), ("code", show_value(getattr(default, f.name))),
                             meaning, describe_type(field_type(klass, f.name))])
            sect = nodes.section(ids=[nodes.make_id(f"options-{title}")], names=[nodes.fully_normalize_name(title)])
            sect += nodes.title(text=title)
            sect += _table(["option", "default", "meaning", "allowed"], rows, [22, 12, 40, 26])
            out.append(sect)
        return out


class ErrorTypesDirective(Directive):
    """Every :class:`marglik.UserError` subclass the package defines."""

    has_content = False

    def run(self) -> List[nodes.Node]:
        import marglik
        import marglik.tuning  # noqa: F401  (defines ConfigError, CheckpointError, ...)
        from marglik.tuning import backends, loop  # noqa: F401

        seen, stack = [], [marglik.UserError]
        while stack:
            cls = stack.pop(0)
            if cls not in seen:
                seen.append(cls)
                stack += sorted(cls.__subclasses__(), key=lambda c: c.__name__)
        rows = []
        for cls in seen:
            bases = ", ".join(b.__name__ for b in cls.__bases__)
            doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
            rows.append([("code", f"{cls.__module__}.{cls.__name__}"), ("code", bases), doc])
        return [_table(["error type", "derives from", "what it means"], rows, [30, 24, 46])]


def check_public_names(app: Any, env: Any) -> None:
    """Warn (an error under ``-W``) for every public name that autodoc did not document."""
    documented = env.get_domain("py").objects
    modules = [importlib.import_module(m) for m in app.config.marglik_public_modules]
    for module in modules:
        for name in module.__all__:
            full, obj = f"{module.__name__}.{name}", getattr(module, name)
            # one object re-exported by several public modules is documented once, under any of them
            aliases = {f"{m.__name__}.{name}" for m in modules if getattr(m, name, None) is obj}
            if not aliases & set(documented):
                logger.warning(f"public name {full} is not in the API reference: add it to docs/reference/api*.rst")
            elif (inspect.isclass(obj) or inspect.isroutine(obj)) and not (inspect.getdoc(obj) or "").strip():
                # (a type alias or constant is documented by its ``#:`` comment, which autodoc reads)
                logger.warning(f"public name {full} has no docstring")


def setup(app: Any) -> dict:
    """Register the directives, the config value and the check."""
    app.add_config_value("marglik_public_modules", [], "env")
    app.add_directive("marglik-help", HelpDirective)
    app.add_directive("marglik-options", OptionsDirective)
    app.add_directive("marglik-report-help", ReportHelpDirective)
    app.add_directive("marglik-error-types", ErrorTypesDirective)
    app.connect("env-check-consistency", check_public_names)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

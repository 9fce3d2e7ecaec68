"""The command line every job shares: --recipe, --set section.key=value, --print-config, and a --help
that lists every recipe field with its docstring."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import sys
import textwrap
import typing
from typing import Any

import tomli_w

from pipelines.config import _SECTIONS, Recipe, load_recipe


class RecipeArgumentParser(argparse.ArgumentParser):
    """argparse, with `--print-config` answered once the recipe and overrides are parsed."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "print_config", None):
            sys.stdout.write(format_recipe(load_recipe(parsed.recipe, parsed.overrides), parsed.print_config))
            self.exit(0)
        return parsed


def recipe_argparser(description: str) -> argparse.ArgumentParser:
    """The command line every job shares: --recipe NAME, repeated --set section.key=value and
    --print-config; --help lists every recipe field with its docstring."""
    parser = RecipeArgumentParser(description=description, epilog=recipe_help(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny", help="recipes/<name>.toml or a path to a .toml file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe field, e.g. --set paths.root=s3://bucket/run")
    parser.add_argument("--print-config", nargs="?", const="toml", choices=("toml", "json"), default=None,
                        help="print the resolved recipe (overrides applied; TOML unless json) and exit")
    return parser


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings of a dataclass's fields: the string literal right after each field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    docs = {}
    statements = body.body if isinstance(body, ast.ClassDef) else []
    for stmt, after in zip(statements, statements[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> Any:
    factory: Any = f.default_factory
    return factory() if f.default is dataclasses.MISSING else f.default


@functools.cache
def recipe_help() -> str:
    """Every section and field of a recipe, with its type, default and docstring (for --help)."""
    lines = ["recipe fields (the defaults; a recipe may set others, see --print-config). Set any with",
             "--set SECTION.KEY=VALUE, e.g. --set train.lr=2e-5"]
    for name in _SECTIONS:
        cls = typing.get_type_hints(Recipe)[name]
        lines += ["", f"[{name}]  {(cls.__doc__ or '').strip().splitlines()[0]}"]
        if name == "trim":
            lines.append("  preset = \"default\"  (default | paper | official | official:<float> | ratio:<float>)")
            lines.append("      the preset the trim fields below are applied to")
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  {_toml_line(f.name, _default(f))}  ({_type_name(hints[f.name])})")
            lines.append(textwrap.fill(docs.get(f.name, ""), width=100, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
    return "\n".join(lines)


def _toml_line(name: str, value: Any) -> str:
    """`name = value` as TOML writes it (a field whose default is None is unset)."""
    return f"{name} = (unset)" if value is None else tomli_w.dumps({name: value}).strip()


def format_recipe(recipe: Recipe, fmt: str = "toml") -> str:
    """The resolved recipe as TOML (loadable again as a recipe file) or JSON."""
    data = recipe.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    # TOML has no null: a field left None is left out, and reads back as its default
    set_only = {k: {f: v for f, v in values.items() if v is not None} if isinstance(values, dict) else values
                for k, values in data.items()}
    return tomli_w.dumps(set_only)

"""mkdocs hook: the reference pages, generated from the code at every build so they cannot go stale.

- reference/cli.md: every entry point's flags, read from its real argparse parser;
- reference/manifest.md: the manifest's fields, from `export/runtime/manifest.py` (FIELDS and the order
  `build_manifest` writes them in, with the comments beside them in the source);
- reference/exit-codes.md: the typed errors of `export/errors.py` and each command's epilog.

Importing the parsers needs no TensorFlow, except the ONNX opset's default text (tf2onnx).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import io
import tokenize

GENERATED = ("reference/cli.md", "reference/manifest.md", "reference/exit-codes.md")
FORMAT_ENTRY = "python -m export.{fmt}"


# -- mkdocs events ------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    for src_uri, render in zip(GENERATED, (cli_page, manifest_page, exit_codes_page), strict=True):
        files.append(File.generated(config, src_uri, content=render()))
    return files


# -- CLI flags ----------------------------------------------------------------------------------


@functools.cache
def entry_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command, parser) of every entry point, built by the functions the commands call."""
    from export import cli
    from export.arm.cli import build_parser as arm_parser
    from export.bench.options import build_parser as bench_parser
    from export.command import build_parser as xattn_parser
    from export.formats import REGISTRY
    from export.runtime.serve.cli import build_parser as serve_parser
    from export.runtime.serve.loadbench import build_parser as loadbench_parser
    from export.runtime.verify.cli import build_parser as verify_parser

    parsers = [("python -m export", cli.build_parser())]
    for fmt in REGISTRY:  # each export/<fmt>/__main__.py: the shared parser, one format
        prog = FORMAT_ENTRY.format(fmt=fmt)
        parsers.append((prog, cli.build_parser((fmt,), prog=prog)))
    parsers += [
        ("xattn", xattn_parser()),  # every command below, as `xattn COMMAND` (export.command)
        ("python -m export.verify", verify_parser()),
        ("python -m export.arm", arm_parser()),
        ("python -m export.serve", serve_parser()),
        ("python -m export.serve.loadbench", loadbench_parser()),
        ("python -m export.bench", bench_parser()),
    ]
    return parsers


def _cell(text: object) -> str:
    """Plain text for a table cell: one line, `|` escaped, `<name>` shown rather than taken as HTML."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.nargs == 0:
        return names
    value = action.metavar or (("{" + ",".join(action.choices) + "}") if action.choices
                               else action.dest.upper())
    return f"{names} `{value}`" if action.option_strings else names  # a code span keeps its `|`


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return parser._get_formatter()._expand_help(action)  # %(default)s and friends, as --help shows


def _default(action: argparse.Action) -> str:
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
            or action.default == [] or action.nargs == 0:
        return ""
    return f"`{action.default}`"


def _actions(parser: argparse.ArgumentParser):
    """(group title, action) in --help order, without -h/--help."""
    for group in parser._action_groups:
        for action in group._group_actions:
            if not isinstance(action, argparse._HelpAction):
                yield group.title, action


def _table(parser, rows) -> list[str]:
    lines = ["| flag | default | what |", "|---|---|---|"]
    lines += [f"| {_flag(a)} | {_default(a)} | {_cell(_help(parser, a))} |" for a in rows]
    return lines


def cli_page() -> str:
    parsers = entry_parsers()
    main_prog, main = parsers[0]
    formats = [(prog, p) for prog, p in parsers[1:] if prog.startswith("python -m export.")
               and p.description and "artifact(s)" in p.description]
    others = [(prog, p) for prog, p in parsers[1:] if (prog, p) not in formats]
    out = [
        "# Command-line flags",
        "",
        "Generated at build time from the argparse parsers the commands use (`docs/hooks.py`):",
        "what `--help` prints, as tables. Exit codes: [Exit codes](exit-codes.md).",
        "",
        "Both spellings work: every `python -m export...` command below is also an `xattn` "
        "subcommand (the console script `pip install` puts beside `python`; `xattn --help` lists "
        "them): `xattn export onnx ...` is `python -m export.onnx ...`, `xattn export ...` "
        "is `python -m export ...`, `xattn verify` is "
        "`python -m export.verify`, and so on for `serve`, `bench` (`xattn bench serve`: "
        "`python -m export.serve.loadbench`) and `arm` ([`xattn`](#xattn) below).",
        "",
        f"## `{main_prog}` and the format entry points",
        "",
        ", ".join(f"`{prog}`" for prog, _ in formats)
        + f" take the flags of `{main_prog}` that apply to their format. `{main_prog}` builds "
        "every format.",
        "",
        "```text",
        main.format_usage().strip(),
        "```",
        "",
        _cell(main.description),
        "",
    ]
    groups: dict[str, list] = {}
    for title, action in _actions(main):
        groups.setdefault(title, []).append(action)
    for title, actions in groups.items():
        out += [f"### {title[:1].upper() + title[1:]}", ""]
        out += _table(main, actions) + [""]
    # What differs in a format's own entry point: flags it lacks or alone has, help of its own.
    main_help = {a.dest: _help(main, a) for _, a in _actions(main)}
    out += ["### Per format", "",
            "| command | flags it does not take | defaults of its own |", "|---|---|---|"]
    only = []
    for prog, parser in formats:
        own = {a.dest: (a, _help(parser, a)) for _, a in _actions(parser)}
        lacks = [f"`{a.option_strings[0]}`" for _, a in _actions(main)
                 if a.dest not in own and a.option_strings]
        differs = [f"`{a.option_strings[0]}`: {_cell(text)}" for dest, (a, text) in own.items()
                   if main_help.get(dest) not in (None, text)]
        only += [(prog, parser, a) for dest, (a, _) in own.items() if dest not in main_help]
        out.append(f"| `{prog}` | {', '.join(lacks)} | {'; '.join(differs)} |")
    out.append("")
    if only:
        out += ["### Flags of one format", "", "| flag | command | default | what |", "|---|---|---|---|"]
        out += [f"| {_flag(a)} | `{prog}` | {_default(a)} | {_cell(_help(parser, a))} |"
                for prog, parser, a in only]
        out.append("")
    for prog, parser in others:
        out += [f"## `{prog}`", "", "```text", parser.format_usage().strip(), "```", "",
                _cell(parser.description or ""), ""]
        out += _table(parser, [a for _, a in _actions(parser)]) + [""]
        if parser.epilog:
            out += [_cell(parser.epilog), ""]
    return "\n".join(out)


# -- the manifest -------------------------------------------------------------------------------


def _comments(source: str) -> dict[int, str]:
    """line number -> the comment at the end of that line."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def _type_name(kind) -> str:
    if kind is None:
        return "any"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "string", int: "integer", float: "number", list: "array", dict: "object",
             bool: "boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# What the spreads in build_manifest's dict hold; an unknown spread is shown as its source.
SPREADS = {
    "facts": "what the reference says of itself: `config`, `shapes`, `masks` (the layer) or "
             "`model` (a whole model: `folded`, `rewritten`, `sha256`, ...; `keras2` for a file "
             "saved by Keras 2: the version, the format, fusionlab's layers and their heads)",
    "format_facts": "the builder's facts about the file, e.g. `opset` (ONNX)",
}


def _written_fields(module) -> list[tuple[str, str, bool]]:
    """(key, comment, optional) in the order `build_manifest` writes them."""
    source = inspect.getsource(module.build_manifest)
    tree = ast.parse(inspect.cleandoc("\n" + source) if source.startswith(" ") else source)
    (ret,) = [n for n in ast.walk(tree) if isinstance(n, ast.Return)]
    fields = []
    for key, value in zip(ret.value.keys, ret.value.values, strict=True):
        if key is not None:
            fields.append((f"`{key.value}`", "", False))
        elif isinstance(value, ast.IfExp) and isinstance(value.body, ast.Dict):
            fields += [(f"`{k.value}`", f"only when `{ast.unparse(value.test)}`", True)
                       for k in value.body.keys]
        else:
            name = ast.unparse(value)
            fields.append((f"(`**{name}`)", SPREADS.get(name, f"`{name}`"), False))
    return fields


def manifest_page() -> str:
    from export.runtime import manifest

    source = inspect.getsource(manifest)
    comments = _comments(source)
    tree = ast.parse(source)
    (fields_node,) = [n for n in tree.body if isinstance(n, ast.AnnAssign)
                      and getattr(n.target, "id", "") == "FIELDS"]
    key_lines = {k.value: k.lineno for k in fields_node.value.keys}
    out = [
        "# The manifest",
        "",
        "Generated at build time from `export/runtime/manifest.py`, the one module that writes and "
        "validates manifests (`docs/hooks.py`). Each published artifact has one, "
        "`<artifact>.json`, beside it. What the fields mean: "
        "[What is in the output folder](../exporting/layer.md#what-is-in-the-output-folder).",
        "",
        "## Fields `export.runtime.verify` relies on",
        "",
        "`FIELDS`: the JSON type each must hold. Required: "
        + ", ".join(f"`{k}`" for k in manifest.REQUIRED_FIELDS)
        + ". Fields naming a file, which must stay inside the manifest's folder: "
        + ", ".join(f"`{k}`" for k in manifest.PATH_FIELDS) + ".",
        "",
        "| field | JSON type | required | what |",
        "|---|---|---|---|",
    ]
    for key, kind in manifest.FIELDS.items():
        required = "yes" if key in manifest.REQUIRED_FIELDS else ""
        out.append(f"| `{key}` | {_type_name(kind)} | {required} | "
                   f"{_cell(comments.get(key_lines[key], ''))} |")
    out += [
        "",
        "## Every field, in the order written",
        "",
        "`build_manifest` writes these keys in this order (`write_manifest`: indented JSON, "
        "ASCII).",
        "",
        "| key | note |",
        "|---|---|",
    ]
    out += [f"| {key} | {_cell(note)} |" for key, note, _ in _written_fields(manifest)]
    out += [
        "",
        "## `quantization`",
        "",
        "`{mode, scheme[, weights, activations], io_dtype, calibration, n_samples}` "
        "(`quantization_entry`). `scheme` by `--quantize` mode:",
        "",
        "| mode | scheme | weights | activations |",
        "|---|---|---|---|",
    ]
    for mode, scheme in manifest.QUANTIZATION_SCHEMES.items():
        out.append(f"| `{mode}` | `{scheme}` | | |")
    for scheme, parts in manifest.INT8_SCHEMES.items():
        out.append(f"| `int8` | `{scheme}` | {parts['weights']} | {parts['activations']} |")
    out += [
        "",
        "## Limits when reading",
        "",
        f"- a manifest larger than {manifest.MAX_MANIFEST_BYTES:,} bytes is refused unread;",
        f"- a golden file inflating beyond {manifest.MAX_GOLDEN_BYTES:,} bytes is refused;",
        f"- tensors must have numpy dtype kinds `{manifest.NUMBER_KINDS}` (bool, int, uint, float).",
        "",
    ]
    return "\n".join(out)


# -- exit codes ---------------------------------------------------------------------------------


def exit_codes_page() -> str:
    from export import errors

    classes = [c for c in errors.error_classes() if c is not errors.ExportError]
    classes.sort(key=lambda c: c.exit_code)  # stable: in the order errors.py defines them
    out = [
        "# Exit codes",
        "",
        "Generated at build time from `export/errors.py` (`docs/hooks.py`): library code raises "
        "these typed errors (subclasses of `ExportError`, a `ValueError`); only the command "
        "lines turn them into an exit code and one line on stderr, never a traceback.",
        "",
        "| exit code | error | when |",
        "|---|---|---|",
        "| 0 | | success |",
    ]
    for cls in classes:
        out.append(f"| {cls.exit_code} | `{cls.__name__}` | {_cell(inspect.getdoc(cls) or '')} |")
    out += [
        "",
        "## Per command",
        "",
        "As each command's `--help` states it:",
        "",
        "| command | exit codes |",
        "|---|---|",
    ]
    for prog, parser in entry_parsers():
        if parser.epilog:
            epilog = parser.epilog.removeprefix("exit codes: ")
            out.append(f"| `{prog}` | {_cell(epilog)} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # print the pages: python docs/hooks.py
    importlib.import_module("export")
    for render in (cli_page, manifest_page, exit_codes_page):
        print(render())

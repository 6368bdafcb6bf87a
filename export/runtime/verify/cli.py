"""The command line of `python -m export.verify PATH`: one line per artifact, a summary, exit 0/1/2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from export.errors import SigningError, UsageError, exit_codes_epilog, printable, reader_may_leave
from export.flags import OneLineParser, path_arg
from export.reporting import display_prog
from export.runtime.verify import ASCII_MARKS, MARKS, verify_path

PROG = "python -m export.verify"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Check published artifacts against their manifests: sha256, then the golden inputs "
            "run in the artifact's own runtime and compared with the golden outputs within the "
            "manifest's tolerance. Needs numpy and onnxruntime and/or ai-edge-litert only; "
            "SavedModel runs where TensorFlow is importable."
        ),
        epilog=exit_codes_epilog((0, 1, 2), {
            0: "every artifact passed (or was not run for want of its runtime)",
            1: "any artifact failed",
            2: "usage error (no such path, no manifests, bad --public-key, an unwritable --json)"}),
    )
    parser.add_argument("path", metavar="PATH",
                        help="an output folder (every *.onnx.json, *.tflite.json, "
                             "*_savedmodel.json in it) or one manifest")
    parser.add_argument("--public-key", type=path_arg, metavar="KEY.pub",
                        help="check each set's signature (<artifact>.sig) with this elliptic-curve "
                             "public key first; an unsigned set, another key's signature or a "
                             "file changed after signing fails")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every result (status, reason, metrics, tolerance, the "
                             "outputs' sha256) as a JSON list to PATH")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print failures and the summary only")
    return parser


def _marks() -> dict[str, str]:
    encoding = getattr(sys.stdout, "encoding", None)
    if not encoding:  # an in-memory text stream holds any character
        return MARKS
    try:
        "".join(MARKS.values()).encode(encoding)
    except (LookupError, UnicodeEncodeError):
        return ASCII_MARKS
    return MARKS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = verify_path(args.path, public_key=args.public_key)
    except (UsageError, SigningError) as e:
        print(f"{display_prog(PROG)}: error: {printable(str(e))}", file=sys.stderr)
        return e.exit_code
    if args.json:
        try:
            _write_json(args.json, results)
        except OSError as e:
            print(f"{display_prog(PROG)}: error: cannot write --json {printable(args.json)}: "
                  f"{e.strerror or e}", file=sys.stderr)
            return 2
    marks = _marks()
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "not run")}
    summary = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["not run"]:
        summary += f", {counts['not run']} not run"
    where = printable(args.path)
    with reader_may_leave():
        for r in results:
            if not args.quiet or r.failed:
                print(r.line(marks))
        print(f"{summary} ({len(results)} manifest{'s' if len(results) != 1 else ''} in {where})")
    return 1 if counts["failed"] else 0


def _write_json(path: str, results) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([r.as_json() for r in results], f, indent=1)
    os.replace(tmp, path)

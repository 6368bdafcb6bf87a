"""The command line of `python -m export.arm`: a table per file, a JSON report, exit 0/1/2/8/9."""

from __future__ import annotations

import json
import os
import sys

from export.arm import DEFAULT_CACHE, DEFAULT_CPUS, check_path
from export.errors import exit_codes_epilog, printable, reader_may_leave
from export.flags import OneLineParser
from export.reporting import configure_logging, report_failures

PROG = "python -m export.arm"


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Verify published artifacts on x86 and under aarch64 user-mode emulation (qemu, an "
            "arm64 Debian root file system and the aarch64 wheels of the same runtimes, cached "
            "under --cache), once per CPU model; compare them per file. A file beyond its gate on "
            "an ARM model passes only if its manifest declares it (deployment.arm, written by "
            "python -m export --arm)."
        ),
        epilog=exit_codes_epilog((0, 1, 2, 8, 9, 130), {
            0: "every file passed (or failed only where its manifest says so)", 1: "a file failed",
            2: "usage error", 8: "qemu/mmdebstrap missing or a download failed",
            9: "the emulated verifier crashed or gave no result"}),
    )
    parser.add_argument("path", metavar="PATH", nargs="?", default="artifacts",
                        help="an output folder or one manifest (default artifacts)")
    parser.add_argument("--cpu", action="append", metavar="MODEL",
                        help="a qemu CPU model, with properties if any (max,sme=off); repeat for "
                             f"several (default: {' '.join(DEFAULT_CPUS)})")
    parser.add_argument("--cache", metavar="DIR",
                        help="root file system and wheels (default $XATTN_CACHE_DIR/arm, else "
                             "${XDG_CACHE_HOME:-~/.cache}/xattn/arm; printed when used)")
    parser.add_argument("--mirror", metavar="URL",
                        help="Debian mirror for mmdebstrap (default $XATTN_ARM_MIRROR or "
                             "http://deb.debian.org/debian)")
    parser.add_argument("--index-url", metavar="URL",
                        help="pip index for the aarch64 wheels (default $XATTN_ARM_INDEX_URL or pip's)")
    parser.add_argument("--report", metavar="PATH.json", help="write the whole report as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="print failures and the summary only")
    return parser


def _cell(result: dict | None, declared: bool | None) -> str:
    if result is None:
        return "-"
    if result["status"] == "not run":
        return "not run"
    m = result["metrics"]
    text = f"{m['max_abs']:.1e}" if m else "?"
    if m and "max_rel_error" in result.get("gate", {}):
        text += f" (rel {m['rel_l2']:.1e})"
    if result["status"] == "failed":
        text += " beyond gate, declared" if declared is False else " FAILED"
    return text


def _bits(entry: dict, x86_digest: str) -> str:
    """Which runs gave the same output bits: one letter per digest, x86 first then each CPU
    model (`AABC`: x86 and the first model agree, the other two differ from them and each other)."""
    digests = [x86_digest] + [c.get("outputs_sha256", "") for c in entry["cpus"].values()]
    if not all(digests):
        return "-"
    letters = {}
    return "".join(letters.setdefault(d, "ABCDEFGH"[len(letters)]) for d in digests)


def print_report(report: dict, quiet: bool) -> None:
    cpus = list(report["cpus"])
    header = ["artifact", "gate", "x86 max abs", *[f"-cpu {c}" for c in cpus], "bits x86,cpus"]
    rows = [header]
    for f in report["files"]:
        if quiet and not f["problems"]:
            continue
        gate = f["gate"]
        gate_text = (f"atol {gate['atol']:g}" if "atol" in gate else
                     f"rel {gate['max_rel_error']:g}" if "max_rel_error" in gate else "-")
        x86 = {**f["x86"], "gate": gate}
        rows.append([f["artifact"], gate_text, _cell(x86, None),
                     *[_cell({**f["cpus"][c], "gate": gate}, f["cpus"][c]["declared_within_gate"])
                       if c in f["cpus"] else "-" for c in cpus],
                     _bits(f, f["x86"].get("outputs_sha256", ""))])
    widths = [max(len(printable(r[i])) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(printable(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for f in report["files"]:
        for problem in f["problems"]:
            print(f"✗ {printable(f['artifact'])}  {printable(problem)}")
    for cpu, p in report["cpus"].items():
        print(f"-cpu {cpu}: {' '.join(p['features']) or 'no fp16/dotprod/i8mm/sve/sme'}")
    n = len(report["files"])
    print(f"{n - report['failed']} passed, {report['failed']} failed on x86 and aarch64 "
          f"({report['emulator']}; {', '.join(f'{k} {v}' for k, v in report['runtimes'].items())})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(False, args.quiet)  # the cache folder, when provisioning uses it
    cpus = tuple(args.cpu) if args.cpu else DEFAULT_CPUS
    report, code = report_failures(PROG, lambda: check_path(
        args.path, cpus=cpus, cache=args.cache or DEFAULT_CACHE, mirror=args.mirror,
        index_url=args.index_url))
    if code:
        return code
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    with reader_may_leave():
        print_report(report, args.quiet)
    return 1 if report["failed"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

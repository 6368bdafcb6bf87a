"""The report: machine, latency and size tables, and the verdicts of the comparison."""

from __future__ import annotations

import contextlib
import logging
import os
import platform

from export.bench.options import variant_label
from export.formats import get_format

log = logging.getLogger("export")

# Targets of the comparison, judged at one configuration (units 64, heads 4, lengths 10,
# features 64, one thread): speedup over Keras's export per (runtime, batch), and the rest.
SPEEDUP_TARGETS = {("onnx", 1): 2.0, ("onnx", 32): 1.6, ("tflite", 1): 1.4, ("tflite", 32): 1.25}
PEAK_TARGET = 0.60
SIZE_TARGET = 0.90
PARITY_TARGET = 1e-4
STARTUP_TARGET = 1.5
TARGET_CONFIG = {"units": 64, "heads": 4, "query_len": 10, "kv_len": 10,
                 "query_features": 64, "kv_features": 64}


def machine() -> dict:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(Exception):
        load = os.getloadavg()[0]
        return {"cpu": model, "cores": os.cpu_count(), "system": platform.platform(),
                "load_1min_at_start": load}
    return {"cpu": model, "cores": os.cpu_count(), "system": platform.platform()}


def _fmt_us(stats: dict) -> str:
    return f"{stats['median']:.1f} ({stats['p90']:.1f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def render(report: dict) -> str:
    peak = report["peak"]
    parts = []
    m = report["machine"]
    parts.append(
        f"machine: {m['cpu']}, {m['cores']} cores; threads {report['config']['threads']}; "
        f"units {report['config']['units']}, heads {report['config']['heads']}, features "
        f"{report['config']['query_features']}/{report['config']['kv_features']}")
    parts.append(
        f"SGEMM peak {peak['gflops']:.0f} GFLOP/s ({peak['source']}); numpy {peak['numpy']['library']} "
        f"{peak['numpy']['gflops']:.0f} GFLOP/s (n={peak['numpy']['size']}), onnxruntime MLAS "
        f"{peak['onnxruntime']['gflops']:.0f} GFLOP/s (n={peak['onnxruntime']['size']})")
    header = ["runtime", "variant", "Tq/Tkv", "batch", "ours µs (p90)", "Keras µs (p90)",
              "speedup", "GFLOP/s", "% peak", "exec GFLOP/s", "exec % peak", "call µs",
              "floor µs", "x floor"]
    rows = []
    for r in report["latency"]:
        common = [r["runtime"], variant_label(r["variant"], r["format"]), f"{r['query_len']}/{r['kv_len']}",
                  str(r["batch"])]
        if "error" in r:
            rows.append(common + ["failed", _fmt_us(r["keras_us"]), "", "", "", "", "", "", "",
                                  ""])
            continue
        rows.append(common + [
            _fmt_us(r["ours_us"]), _fmt_us(r["keras_us"]), f"{r['speedup']:.2f}x",
            f"{r['gflops']:.0f}", f"{r['pct_peak']:.0f}%", f"{r['executed_gflops']:.0f}",
            f"{r['executed_pct_peak']:.0f}%", f"{r['overhead_us']['median']:.1f}",
            f"{r['floor_us']:.1f}", f"{r['floor_distance']:.2f}x",
        ])
    parts.append(_table(header, rows))
    parts.append(
        "GFLOP/s and % peak count the layer's documented FLOPs (50.5 MFLOP at batch 32 and the "
        "defaults); exec counts what our folded graph runs (export.graph.executed_flops). call µs: "
        "a one-op graph with the same inputs and outputs in the same runtime; floor = call + exec "
        "FLOPs at the SGEMM peak timed in the same cell; x floor = ours / floor.")
    size_rows = [[s["runtime"], variant_label(s["variant"], s["format"]), f"{s['query_len']}/{s['kv_len']}",
                  str(s["batch"]), f"{s['ours_bytes'] / 1024:.1f} KB",
                  f"{s['keras_bytes'] / 1024:.1f} KB", f"{s['ratio']:.2f}x",
                  f"{s['ours_max_abs']:.1e}", f"{s['ours_rel_l2']:.1e}",
                  f"{s['keras_max_abs']:.1e}", s["layout"]]
                 for s in report["sizes"]]
    parts.append(_table(["artifact", "variant", "Tq/Tkv", "batch", "ours size", "Keras size",
                         "ratio", "ours max|diff|", "ours rel L2", "Keras max|diff|",
                         "our layout"], size_rows))
    if report.get("startup"):
        s = report["startup"]
        parts.append(
            f"startup: `{s['command']}` {s['ours']['median_s']:.2f} s (sd {s['ours']['sd_s']:.2f}) "
            f"vs bare Keras export script {s['keras']['median_s']:.2f} s (sd "
            f"{s['keras']['sd_s']:.2f}): {s['ratio']:.2f}x, {s['ours']['runs']} runs each")
    if report.get("verdicts"):
        lines = ["ours vs Keras export (at units 64, heads 4, lengths 10, features 64, one thread):"]
        for g in report["verdicts"]:
            mark = "met" if g["met"] else "NOT met"
            lines.append(f"  [{mark}] {g['target']}: {g['value']}")
        parts.append("\n".join(lines))
    elif report.get("verdicts_note"):
        parts.append(report["verdicts_note"])
    return "\n\n".join(parts)


def _sizes(report_rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in report_rows:
        if "error" in r:
            continue
        key = (r["format"], r["variant"], r["query_len"], r["kv_len"],
               r["batch"] if r["format"] == "tflite" else None)
        if key in seen:
            continue
        seen.add(key)
        out.append({"runtime": r["runtime"], "format": r["format"], "variant": r["variant"],
                    "query_len": r["query_len"], "kv_len": r["kv_len"],
                    "batch": r["batch"] if r["format"] == "tflite" else r["ours_onnx_batch"],
                    "ours_bytes": r["ours_bytes"], "keras_bytes": r["keras_bytes"],
                    "ratio": r["ours_bytes"] / r["keras_bytes"], "ours_max_abs": r["ours_max_abs"],
                    "ours_rel_l2": r["ours_rel_l2"], "keras_max_abs": r["keras_max_abs"],
                    "layout": r["ours_layout"]})
    return out


def evaluate_verdicts(report: dict) -> list[dict] | None:
    cfg = report["config"]
    if cfg["threads"] != 1 or any(cfg[k] != v for k, v in TARGET_CONFIG.items()
                                  if k not in ("query_len", "kv_len")):
        return None
    rows = [r for r in report["latency"] if r["query_len"] == 10 and r["kv_len"] == 10
            and r["variant"] == "none" and "error" not in r]
    if not rows:
        return None
    verdicts = []
    by = {(r["format"], r["batch"]): r for r in rows}
    for (fmt, batch), need in SPEEDUP_TARGETS.items():
        r = by.get((fmt, batch))
        if r:
            label = get_format(fmt).runtime_label
            verdicts.append({"target": f"{label} batch {batch}: ours vs Keras export >= {need}x",
                             "value": f"{r['speedup']:.2f}x ({r['ours_us']['median']:.1f} vs "
                                   f"{r['keras_us']['median']:.1f} µs)",
                          "met": r["speedup"] >= need})
    at32 = [r for r in rows if r["batch"] == 32]
    if at32:
        fastest = min(at32, key=lambda r: r["ours_us"]["median"])
        verdicts.append({
            "target": f"batch 32 in the faster runtime >= {PEAK_TARGET:.0%} of the SGEMM peak "
                    "(documented FLOPs)",
            "value": f"{fastest['runtime']}: {fastest['gflops']:.0f} GFLOP/s = "
                     f"{fastest['pct_peak']:.0f}% of {report['peak']['gflops']:.0f} (counting the "
                     f"FLOPs our graph runs: {fastest['executed_pct_peak']:.0f}%)",
            "met": fastest["pct_peak"] >= 100 * PEAK_TARGET})
    for s in report["sizes"]:
        if s["variant"] == "none" and s["query_len"] == 10:
            verdicts.append({"target": f"{s['runtime']} float32 file (batch {s['batch']}) <= "
                                  f"{SIZE_TARGET}x Keras's",
                          "value": f"{s['ratio']:.2f}x ({s['ours_bytes']} vs {s['keras_bytes']} bytes)",
                          "met": s["ratio"] <= SIZE_TARGET})
    worst = max(max(r["ours_max_abs"], r["manifest_parity"]["max_abs"]) for r in rows)
    verdicts.append({"target": f"parity <= {PARITY_TARGET:g} max abs diff vs the Keras layer",
                  "value": f"{worst:.1e} (bench inputs and the manifests' verification)",
                  "met": worst <= PARITY_TARGET})
    if report.get("startup"):
        s = report["startup"]
        verdicts.append({"target": f"python -m export.onnx end to end <= {STARTUP_TARGET}x a bare Keras "
                              "export script",
                      "value": f"{s['ratio']:.2f}x ({s['ours']['median_s']:.2f} vs "
                               f"{s['keras']['median_s']:.2f} s)",
                      "met": s["ratio"] <= STARTUP_TARGET})
    return verdicts

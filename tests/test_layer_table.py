"""Which Keras layers export in which format: a small model around each (tests/layer_zoo.py) goes
through `python -m export --model` for real, and the docs' table (docs/exporting/models.md) is
this test's output.

Regenerate the table after a change: `XATTN_WRITE_LAYER_TABLE=1 pytest tests/test_layer_table.py`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import keras
import numpy as np
import pytest
from conftest import REPO
from keras import ops
from layer_zoo import UNSAFE, ZOO, randomize_weights, save_zoo_model, zoo_inputs

from export.cli import main
from export.formats import FORMAT_NAMES, get_format

START, END = "<!-- layer-table:start -->", "<!-- layer-table:end -->"


@keras.saving.register_keras_serializable(package="xattn_tests")
class GramInverse(keras.layers.Layer):
    """A registered custom layer whose op (MatrixInverse) is no TFLite builtin."""

    def call(self, x):
        gram = ops.matmul(ops.transpose(x, (0, 2, 1)), x) + ops.eye(x.shape[-1])
        return ops.matmul(x, ops.linalg.inv(gram))


def _custom(folder: str) -> str:
    x = keras.Input((8, 6), name="x")
    y = GramInverse(name="gram_inverse")(keras.layers.Dense(6, name="dense")(x))
    model = randomize_weights(keras.Model(x, y, name="gram_inverse"), 7)
    path = os.path.join(folder, "gram_inverse.keras")
    model.save(path)
    return path


CASES = [*ZOO, "custom layer (MatrixInverse)"]


def _export(path: str, out: str, formats: tuple[str, ...], extra: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["--model", path, "--output-dir", out, "--quiet", *extra], formats=formats)
        except SystemExit as e:  # usage errors
            code = int(e.code)
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    return code, lines[-1].split("error: ", 1)[-1] if lines else ""


def _reason(text: str) -> str:
    text = re.sub(r"--model file \S+ ", "", text)
    text = re.sub(r"^\S+\.keras cannot be converted: ", "", text)
    text = text.split("; replace it")[0].replace("could not be loaded safely: it holds a ", "a ")
    return text.replace("|", "/")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict[str, dict[str, str]]:
    folder = str(tmp_path_factory.mktemp("zoo"))
    rows = {}
    for case in CASES:
        path = _custom(folder) if case not in ZOO else save_zoo_model(case, folder)
        extra = []
        if case == "Embedding":
            model = keras.saving.load_model(path, safe_mode=True)
            np.savez(os.path.join(folder, "ids.npz"), **zoo_inputs(model, batch=8))
            extra = ["--sample-inputs", os.path.join(folder, "ids.npz")]
        out = os.path.join(folder, f"out-{len(rows)}")
        code, reason = _export(path, out, FORMAT_NAMES, extra)
        if code == 0:
            rows[case] = {fmt: "✓" for fmt in FORMAT_NAMES}
            continue
        cells = {}
        for fmt in FORMAT_NAMES:  # which formats fail, and why
            code, reason = _export(path, f"{out}-{fmt}", (fmt,), extra)
            cells[fmt] = "✓" if code == 0 else f"✗ exit {code}: {_reason(reason)}"
        rows[case] = cells
    return rows


def render(rows: dict[str, dict[str, str]]) -> str:
    header = "| layer | " + " | ".join(get_format(f).title for f in FORMAT_NAMES) + " |"
    lines = [header, "|" + "---|" * (len(FORMAT_NAMES) + 1)]
    for case, cells in rows.items():
        lines.append(f"| {case} | " + " | ".join(cells[f] for f in FORMAT_NAMES) + " |")
    return "\n".join(lines)


def test_every_layer_but_the_unsafe_and_the_non_builtin_exports(table):
    for case, cells in table.items():
        if case in UNSAFE:
            assert all(c.startswith("✗ exit 3") and "Lambda" in c for c in cells.values()), cells
        elif case.startswith("custom layer"):
            assert cells["tflite"].startswith("✗ exit 4") and "MatrixInverse" in cells["tflite"]
            assert "'gram_inverse'" in cells["tflite"]
        else:
            assert all(c == "✓" for c in cells.values()), (case, cells)


def test_readme_table_is_this_tests_output(table):
    from doc_pages import page_holding

    readme_path = page_holding(START)  # docs/exporting/models.md
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    rendered = f"{START}\n{render(table)}\n{END}"
    if os.environ.get("XATTN_WRITE_LAYER_TABLE"):
        readme = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: rendered, readme,
                        flags=re.S)
        with open(readme_path, "w", encoding="utf-8") as f:
            f.write(readme)
    page = os.path.relpath(readme_path, REPO)
    assert rendered in readme, f"{page}'s layer table is stale; the test produced:\n{rendered}"

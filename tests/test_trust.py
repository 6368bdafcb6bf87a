"""Trust, second round (issue 15): one test per hole a hostile tester found, and signed sets.

Artifacts come from the session `artifact_factory` (copied before a test changes them); a
subprocess runs only where a command line, a second process or a second mount namespace is the
point. Shapes are small.
"""

from __future__ import annotations

import numpy as np
import pytest

# -- 5. the layer refuses batches known to differ -------------------------------------------------


@pytest.mark.parametrize("batches", [(2, 1), (1, 2), (3, 2)], ids=["2vs1", "1vs2", "3vs2"])
def test_layer_refuses_different_batch_sizes(batches):
    import keras

    from xattn import CrossAttention

    a = np.zeros((batches[0], 4, 6), np.float32)
    b = np.zeros((batches[1], 5, 7), np.float32)
    shapes = rf"source1.shape=\({batches[0]}, 4, 6\), source2.shape=\({batches[1]}, 5, 7\)"
    with pytest.raises(ValueError, match=r"same batch size.*" + shapes):
        CrossAttention(8, 2)([a, b])
    # Symbolic inputs with known batches too; an unknown batch is left to run time.
    with pytest.raises(ValueError, match="same batch size"):
        CrossAttention(8, 2)([keras.KerasTensor(a.shape), keras.KerasTensor(b.shape)])
    out = CrossAttention(8, 2)([keras.KerasTensor((None, 4, 6)), keras.KerasTensor((2, 5, 7))])
    assert tuple(out.shape) == (None, 4, 8)


def test_mask_shape_error_gives_the_batch():
    from xattn import CrossAttention

    s1, s2 = np.zeros((2, 6, 5), np.float32), np.zeros((2, 9, 7), np.float32)
    with pytest.raises(ValueError, match=r"\(B=2, 9\)"):
        CrossAttention(8, 2)([s1, s2], value_mask=np.ones((2, 6), bool))

"""The SavedModel builder: the inference function saved with the signature `serving_default`."""

from __future__ import annotations

import hashlib
import os

import tensorflow as tf
from tensorflow.core.protobuf import fingerprint_pb2

from export.errors import ConversionError
from export.formats import Built
from export.graph import shared_weights
from export.spec import ArtifactSpec


def build_savedmodel(spec: ArtifactSpec, fn, workdir: str, *, share_weights: bool = True) -> Built:
    """Save `fn` (from `export.graph.build_inference_function`) under `workdir`.

    `fn` may be `{signature key: fn}` (length buckets): one signature each, all reading one
    set of weight variables (`share_weights`; otherwise constants in every signature's graph).

    Returns:
        `Built(folder)`, with a fingerprint whose uuid is derived from its hashes (same input,
        same bytes).

    Raises:
        ConversionError: TensorFlow could not save it.
    """
    path = os.path.join(workdir, spec.artifact_name("savedmodel"))
    # The signature alone: attaching `fn` to the module as well saves a second trace of it,
    # with a second copy of every weight constant (twice the file size).
    module = tf.Module()
    # Variables `fn` reads (a --saved-model signature's, export.saved_model_reference): saved
    # with it, or the file would reference variables it does not hold.
    fns = fn.values() if isinstance(fn, dict) else [fn]
    module.captured = [v for f in fns for v in getattr(f, "trackables", ())]
    try:
        if isinstance(fn, dict) and share_weights:
            # Several signatures (length buckets): each weight once, in the checkpoint.
            with shared_weights(module):
                signatures = concrete_signatures(fn)
        else:
            signatures = concrete_signatures(fn)
        tf.saved_model.save(module, path, signatures=signatures)
    except Exception as e:
        raise ConversionError(f"SavedModel export failed: {e}") from e
    _deterministic_fingerprint(path)
    return Built(path)


def concrete_signatures(fn) -> dict:
    """{key: concrete function}: `fn` as `serving_default`, or a bucketed `{key: fn}` as it is.

    One concrete function per distinct function, so a signature that aliases another
    (`serving_default` = the largest bucket) is one function in the SavedModel, not two.
    """
    fns = fn if isinstance(fn, dict) else {"serving_default": fn}
    concrete = {}
    for f in fns.values():
        if id(f) not in concrete:
            # A fresh trace: one made earlier (another builder, other shared weights) may read
            # variables that no longer exist.
            fresh = tf.function(f.python_function, input_signature=f.input_signature,
                                autograph=False)
            concrete[id(f)] = fresh.get_concrete_function()
    return {key: concrete[id(f)] for key, f in fns.items()}


def _deterministic_fingerprint(path: str) -> None:
    """Replace the random `uuid` of `fingerprint.pb` with one derived from its hashes.

    TensorFlow writes a fresh random uuid into every fingerprint (the other fields hash the
    graph and the checkpoint and are already deterministic); it is the only byte of a
    SavedModel that changes from one identical export to the next.
    """
    fingerprint_path = os.path.join(path, "fingerprint.pb")
    if not os.path.exists(fingerprint_path):
        return  # fingerprinting switched off in this TensorFlow
    with open(fingerprint_path, "rb") as f:
        fingerprint = fingerprint_pb2.FingerprintDef.FromString(f.read())
    if "uuid" not in fingerprint.DESCRIPTOR.fields_by_name:
        return  # a TensorFlow from before the uuid: nothing random in it
    fingerprint.ClearField("uuid")
    digest = hashlib.sha256(fingerprint.SerializeToString(deterministic=True)).digest()
    # Same form as TensorFlow's: a 128-bit number in decimal.
    fingerprint.uuid = str(int.from_bytes(digest[:16], "big"))
    with open(fingerprint_path, "wb") as f:
        f.write(fingerprint.SerializeToString(deterministic=True))

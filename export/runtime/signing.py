"""Signed artifact sets: the OpenSSF `model-signing` library with an elliptic-curve key, offline.

A set is what one manifest describes: the artifact (every file of a SavedModel folder), the
manifest itself, the golden vectors and the reference `.keras`. `sign_set` writes its Sigstore
bundle to `<artifact>.sig` in the staging folder, before the atomic publish; `verify_set` checks it
with the public key before anything else is trusted. A sha256 in a manifest proves nothing to
someone who can rewrite the manifest too; a signature over the manifest does.

numpy-free and TensorFlow-free: `export.runtime.verify` uses this module. `model-signing` is an optional
extra (`pip install 'xattn[sign]'`), imported only when a key is given.
"""

from __future__ import annotations

import os
import pathlib

from export.errors import ManifestError, SigningError, first_line, one_line

SIGNATURE_SUFFIX = ".sig"
# Environment variable holding the password of an encrypted private key (never a flag: shells log
# their command lines).
PASSWORD_ENV = "XATTN_SIGN_KEY_PASSWORD"


def signature_name(manifest: dict) -> str:
    return f"{manifest['artifact']}{SIGNATURE_SUFFIX}"


def set_files(folder: str, manifest_name: str, manifest: dict) -> list[str]:
    """The set's files relative to `folder` (POSIX paths): artifact files, manifest, golden, reference.

    A SavedModel folder is walked as it is on disk, so a file added to it after signing shows.
    """
    names = []
    artifact = os.path.join(folder, manifest["artifact"])
    if os.path.isdir(artifact):
        for root, _, files in os.walk(artifact):
            for name in files:
                names.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    else:
        names.append(manifest["artifact"])
    names.append(manifest_name)
    for entry in manifest.get("files", []):  # companions (TFLM's C++), when listed
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            names.append(entry["file"])
    for key in ("golden", "reference"):
        if isinstance(manifest.get(key), str):
            names.append(manifest[key])
    return sorted(set(names))


def _model_signing():
    """The library's modules; a missing extra is a one-line error, not a traceback."""
    try:  # lazy: an optional extra, needed only with --sign-key / --public-key
        from model_signing import hashing
        from model_signing._signing import sign_ec_key, sign_sigstore_pb
        from model_signing._signing import signing as payloads
    except ImportError as e:
        raise SigningError(
            f"signing needs the model-signing package (pip install 'xattn[sign]'): {first_line(e)}"
        ) from e
    return hashing, sign_ec_key, sign_sigstore_pb, payloads


def _hash(hashing, folder: str, names: list[str]):
    paths = [pathlib.Path(folder, *name.split("/")) for name in names]
    return hashing.Config().use_file_serialization(hashing_algorithm="sha256").hash(
        pathlib.Path(folder), files_to_hash=paths
    )


def load_signer(private_key: str):
    """The signer for a PEM elliptic-curve private key; SigningError naming the file otherwise."""
    _, sign_ec_key, _, _ = _model_signing()
    if not os.path.isfile(private_key):
        raise SigningError(f"--sign-key file not found: {private_key}")
    try:
        return sign_ec_key.Signer(pathlib.Path(private_key), os.environ.get(PASSWORD_ENV))
    except Exception as e:  # cryptography raises ValueError/TypeError/UnsupportedAlgorithm
        raise SigningError(
            f"--sign-key {private_key} is not a usable elliptic-curve private key (PEM): "
            f"{one_line(first_line(e))}"
        ) from e


def sign_set(signer, folder: str, manifest_name: str, manifest: dict) -> str:
    """Sign the set `manifest_name` describes (files in `folder`) into `<artifact>.sig`; its path."""
    hashing, _, _, payloads = _model_signing()
    names = set_files(folder, manifest_name, manifest)
    signature = signer.sign(payloads.Payload(_hash(hashing, folder, names)))
    path = os.path.join(folder, signature_name(manifest))
    signature.write(pathlib.Path(path))
    return path


def signature_present(folder: str, manifest: dict) -> bool:
    return os.path.isfile(os.path.join(folder, signature_name(manifest)))


def load_verifier(public_key: str):
    """The verifier for a PEM elliptic-curve public key; SigningError naming the file otherwise."""
    _, sign_ec_key, _, _ = _model_signing()
    if not os.path.isfile(public_key):
        raise SigningError(f"--public-key file not found: {public_key}")
    try:
        return sign_ec_key.Verifier(pathlib.Path(public_key))
    except Exception as e:
        raise SigningError(
            f"--public-key {public_key} is not an elliptic-curve public key (PEM): "
            f"{one_line(first_line(e))}"
        ) from e


def verify_set(verifier, folder: str, manifest_name: str, manifest: dict) -> None:
    """The set's signature was made with the key and covers exactly its files as they are now.

    Raises:
        ManifestError: unsigned, another key, damaged bundle, or a file changed, added or removed.
    """
    hashing, _, sign_sigstore_pb, _ = _model_signing()
    sig_name = signature_name(manifest)
    sig_path = os.path.join(folder, sig_name)
    if not os.path.isfile(sig_path):
        raise ManifestError(f"unsigned: no {sig_name} beside it, and --public-key asks for one")
    try:
        signature = sign_sigstore_pb.Signature.read(pathlib.Path(sig_path))
    except Exception as e:
        raise ManifestError(f"signature {sig_name} is not a Sigstore bundle: {first_line(e)}") from e
    try:
        signed = verifier.verify(signature)
    except Exception as e:  # InvalidSignature, key hint mismatch, malformed payload
        raise ManifestError(
            f"signature {sig_name} was not made with this public key (or was altered): "
            f"{first_line(e) if str(e) else type(e).__name__}"
        ) from e
    signed_digests = {rd.identifier: rd.digest for rd in signed.resource_descriptors()}
    names = set_files(folder, manifest_name, manifest)
    if manifest_name not in signed_digests:
        raise ManifestError(f"signature {sig_name} does not cover {manifest_name}")
    added = [n for n in names if n not in signed_digests]
    if added:
        raise ManifestError(f"changed after signing: {', '.join(added)} added (signature {sig_name})")
    absent = [n for n in signed_digests if not os.path.isfile(os.path.join(folder, n))]
    if absent:
        raise ManifestError(f"signed file(s) missing: {', '.join(sorted(absent))}")
    actual = {rd.identifier: rd.digest for rd in _hash(hashing, folder, names).resource_descriptors()}
    changed = sorted(n for n in names if actual[n] != signed_digests[n])
    extra = sorted(set(signed_digests) - set(names))
    if changed or extra:
        raise ManifestError(
            f"changed after signing: {', '.join(changed + extra)} (signature {sig_name})"
        )

"""Sealing staged artifact sets (artifact, manifest, golden vectors, reference) for publishing.

Called by the pipeline under the folder lock, right before the atomic publish: the reference is
shared with the sets already published under the same name, then each set is signed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from export import signing
from export.manifest import write_manifest
from export.publish import sha256_path

log = logging.getLogger("export")


def kept_reference(output_dir: str, reference_name: str, rebuilt: set[str]) -> str | None:
    """The sha256 of the published reference to keep, or None to publish the new one.

    Keras stamps the save time into a `.keras`, so the same weights saved twice differ in bytes.
    A published reference that a set not rebuilt here records (reference_sha256) stays: replacing
    it would fail that set's verification. The same-name guard has already checked that those
    sets share this export's golden vectors, i.e. its weights.
    """
    path = os.path.join(output_dir, reference_name)
    if not os.path.isfile(path):
        return None
    recorded = set()
    for entry in os.listdir(output_dir):
        if not entry.endswith(".json") or entry in rebuilt or entry.startswith("."):
            continue
        try:
            with open(os.path.join(output_dir, entry), encoding="utf-8") as f:
                manifest = json.load(f)
            if manifest.get("reference") == reference_name:
                recorded.add(str(manifest.get("reference_sha256")))
        except (OSError, ValueError, AttributeError):
            continue  # not one of ours, or damaged: export.verify reports those
    digest = sha256_path(path)
    return digest if digest in recorded else None


def seal(stage: str, output_dir: str, results: list, *, sign_key: str | None = None) -> list[str]:
    """Share the references with published sets, sign each set; the signature names to publish.

    Args:
        stage: the staging folder. output_dir: where the sets are published.
        results: the pipeline's ArtifactResults (`manifest_path`, `manifest`) in the stage.
        sign_key: a PEM elliptic-curve private key, or None.
    """
    rebuilt = {os.path.basename(r.manifest_path) for r in results}
    for reference_name in sorted({r.manifest["reference"] for r in results}):
        kept = kept_reference(output_dir, reference_name, rebuilt)
        if kept is None:
            continue
        # Publish the same bytes again (a no-op rename) and record them in the new manifests.
        shutil.copyfile(os.path.join(output_dir, reference_name), os.path.join(stage, reference_name))
        for r in results:
            if r.manifest["reference"] == reference_name:
                r.manifest["reference_sha256"] = kept
                write_manifest(r.manifest_path, r.manifest)
        log.debug("keep     the published %s (sha256 %s...)", reference_name, kept[:12])
    if not sign_key:
        return []
    signer = signing.load_signer(sign_key)
    names = []
    for r in results:
        path = signing.sign_set(signer, stage, os.path.basename(r.manifest_path), r.manifest)
        names.append(os.path.basename(path))
    log.info("sign     %d set(s) with %s", len(names), os.path.basename(sign_key))
    return names

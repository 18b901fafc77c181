"""The one-file bundle: a zip archive of manifest.json, the compiled library and the TVM runtime.

Reading verifies every member against the manifest's sha256 before any native code is
touched, refuses unsafe member names, and never extracts anything it has not verified.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Mapping

from .errors import BundleFormatError
from .manifest import FileEntry, Manifest

MANIFEST_NAME = "manifest.json"
BUNDLE_SUFFIX = ".edgeq"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_member_name(name: str) -> None:
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name:
        raise BundleFormatError(f"bundle member {name!r} has an unsafe path (absolute or '..'); refusing the bundle")


def write_bundle(path: Path, manifest: Manifest, files: Mapping[str, bytes]) -> Manifest:
    """Write ``files`` and a manifest listing their checksums; returns the manifest written."""
    for name in files:
        _check_member_name(name)
    entries = tuple(FileEntry(name, sha256_bytes(data), len(data)) for name, data in sorted(files.items()))
    manifest = replace(manifest, files=entries)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        for name, data in sorted(files.items()):
            archive.writestr(name, data)
    os.replace(partial, path)
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk and verified: its manifest and member contents."""

    path: Path
    manifest: Manifest
    contents: Mapping[str, bytes]

    def extract(self, directory: Path) -> None:
        """Write the verified members under ``directory``."""
        for name, data in self.contents.items():
            target = Path(directory, *PurePosixPath(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open and verify a bundle; any defect raises BundleFormatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise BundleFormatError(f"{path}: no such bundle file")
    hint = ""
    if path.suffix.lower() in (".tflite", ".onnx"):
        hint = f"; this looks like a model: package it first with `edgeq package {path.name} --device ...`"
    if not zipfile.is_zipfile(path):
        raise BundleFormatError(f"{path} is not an edgeq bundle (not a zip archive, or truncated){hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                _check_member_name(name)
            if MANIFEST_NAME not in names:
                raise BundleFormatError(f"{path} has no {MANIFEST_NAME}: not an edgeq bundle{hint}")
            try:
                manifest_data = json.loads(archive.read(MANIFEST_NAME))
            except ValueError as error:
                raise BundleFormatError(f"{path}: {MANIFEST_NAME} is not valid JSON ({error})") from None
            manifest = Manifest.from_dict(manifest_data)
            listed = {entry.path: entry for entry in manifest.files}
            unexpected = sorted(set(names) - set(listed) - {MANIFEST_NAME})
            if unexpected:
                raise BundleFormatError(f"{path} holds files its manifest does not list: {unexpected}")
            contents: dict[str, bytes] = {}
            for name, entry in listed.items():
                if name not in names:
                    raise BundleFormatError(f"{path} lacks {name}, which its manifest lists")
                data = archive.read(name)
                if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
                    raise BundleFormatError(
                        f"{path}: {name} does not match its sha256 in the manifest; the bundle is "
                        "corrupt or was tampered with - copy or package it again"
                    )
                contents[name] = data
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as error:
        raise BundleFormatError(
            f"{path} is corrupt, truncated or was tampered with ({error}); copy or package it again"
        ) from None
    if manifest.library not in contents:
        raise BundleFormatError(f"{path}: the manifest names library {manifest.library!r}, which is missing")
    return Bundle(path, manifest, contents)

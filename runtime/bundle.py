"""Reading and verifying a bundle: the one contract between the training side and the device.

A bundle is a directory with ``manifest.json`` (see ``docs/bundle.md``) and the files it lists.
This module is torch-free; it checks the format version, that every listed file is present with
its recorded size, and, on request only (``verify_hashes=True``, ``--verify``), every sha256.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = 'anomalygpt-edge-bundle'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the problem."""
    exit_code = 2  # bad input (cli.exit_code)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def open(cls, root, verify_hashes: bool = False) -> "Bundle":
        root = Path(root)
        mpath = root / MANIFEST
        if root.is_file():
            raise BundleError(f"{root}: a file, not a bundle directory (give the directory that holds {MANIFEST})")
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle directory (no such directory)")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: missing; {root} is not a bundle (export one with `anomalygpt-edge export`)")
        try:
            manifest = json.loads(mpath.read_text(encoding='utf-8'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
            raise BundleError(f"{mpath}: not an AnomalyGPT Edge manifest (format field is "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
        version = manifest.get('format_version')
        if version != FORMAT_VERSION:
            raise BundleError(f"{mpath}: format version {version!r} is not supported by this runtime "
                              f"(it reads version {FORMAT_VERSION}); re-export the bundle or upgrade anomalygpt-edge")
        bundle = cls(root, manifest)
        bundle.verify(hashes=verify_hashes)
        return bundle

    # -- verification -------------------------------------------------------------------------
    def verify(self, hashes: bool = False) -> None:
        """Every listed file present with its size; with ``hashes``, its sha256 too."""
        problems = []
        for name, info in self.manifest.get('files', {}).items():
            path = self.root / name
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != info['size']:
                problems.append(f"{path}: {size} bytes, the manifest says {info['size']} (truncated or altered)")
            elif hashes and sha256_file(path) != info['sha256']:
                problems.append(f"{path}: sha256 differs from the manifest (altered or corrupt)")
        if problems:
            raise BundleError(f"bundle {self.root} failed verification:\n  " + '\n  '.join(problems))

    # -- accessors ----------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        if name not in self.manifest.get('files', {}):
            raise BundleError(f"{self.root / MANIFEST}: lists no file {name!r}")
        return self.root / name

    def component(self, name: str, precision: str | None = None) -> dict:
        comps = self.manifest.get('components', {})
        if name not in comps:
            raise BundleError(f"{self.root}: the bundle has no {name!r} component (it has {sorted(comps)})")
        variants = comps[name]
        precision = precision or ('fp32' if 'fp32' in variants else next(iter(variants)))
        if precision not in variants:
            raise BundleError(f"{self.root}: component {name!r} has no {precision!r} variant (it has {sorted(variants)})")
        return variants[precision]

    @property
    def prompt(self) -> dict:
        return self.manifest['prompt']

    @property
    def classes(self) -> dict:
        return self.manifest.get('classes', {})

    @property
    def llm(self) -> dict | None:
        return self.manifest.get('llm')

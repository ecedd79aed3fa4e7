"""Atomic updates of an existing bundle: new files and a new manifest, through the bundle writer.

The listed files are hard-linked (copied across filesystems) into the writer's staging directory,
the new files moved in, the manifest edited, and the whole directory renamed into place: a failure
leaves the previous bundle untouched, and every sha256 in the new manifest is recomputed from the
files it lists. Engines built on the device (``engines/``, never listed) are carried over.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Callable

from ..runtime.bundle import MANIFEST, Bundle

ENGINES = 'engines'


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def update_bundle(bundle_dir, edit: Callable[[dict], None], new_files: dict[str, Path] | None = None,
                  remove: tuple[str, ...] = ()) -> Bundle:
    """``edit(manifest)`` changes a copy of the manifest in place; ``new_files`` maps bundle-relative
    names to files to move in (replacing same-named ones); ``remove`` drops listed files."""
    from ..export.bundle_writer import BundleWriter
    bundle = Bundle.open(bundle_dir, verify_hashes=True)
    root = bundle.root
    new_files = {k: Path(v) for k, v in (new_files or {}).items()}
    manifest = copy.deepcopy({k: v for k, v in bundle.manifest.items()
                              if k not in ('files', 'format', 'format_version', 'created_at')})
    edit(manifest)
    engines_keep = None
    with BundleWriter(root, overwrite=True) as w:
        for name in bundle.manifest['files']:
            if name != MANIFEST and name not in new_files and name not in remove:
                _link_or_copy(root / name, w.path(name))
        for name, src in new_files.items():
            shutil.move(str(src), str(w.path(name)))
        if (root / ENGINES).is_dir():
            # outside the staging dir, so the writer does not list them; moved in after the rename
            engines_keep = root.parent / f'.{root.name}.engines-{os.getpid()}'
            shutil.rmtree(engines_keep, ignore_errors=True)
            shutil.copytree(root / ENGINES, engines_keep, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d)))
        try:
            w.commit(manifest)
        finally:
            if engines_keep is not None and engines_keep.exists():
                target = root / ENGINES
                if w.committed and not target.exists():
                    os.replace(engines_keep, target)
                else:
                    shutil.rmtree(engines_keep, ignore_errors=True)
    return Bundle.open(root)

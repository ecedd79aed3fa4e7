"""Writing a bundle atomically: files are staged in a hidden temporary directory beside the
target, hashed into the manifest, and the directory is renamed into place only when complete.
An export that fails part-way leaves the previous bundle (if any) untouched and no debris."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from ..models import spec
from ..runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file


def package_versions(*names: str) -> dict:
    out = {}
    for n in ('anomalygpt-edge',) + names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def prompt_manifest() -> dict:
    """What the device needs to build the reference's prompt and stop the answer (spec section 6)."""
    return {'start': spec.PROMPT_START, 'image_end': spec.IMAGE_END, 'assistant': spec.ASSISTANT,
            'stop': [spec.STOP_STRING], 'separator': spec.TURN_SEPARATOR, 'question': spec.QUESTION,
            'n_prompts': spec.N_PROMPTS, 'history_first': '{q}\n### Assistant: {a}\n###',
            'history_next': ' Human: {q}\n### Assistant: {a}\n###', 'turn_next': ' Human: {q}',
            'location_words': [list(r) for r in spec.POSITION_WORDS],
            'answer_templates': {'normal': spec.ANSWER_NORMAL, 'one': spec.ANSWER_ONE}}


def preprocess_manifest() -> dict:
    return {'size': spec.IMAGE_SIZE, 'mean': list(spec.CLIP_MEAN), 'std': list(spec.CLIP_STD),
            'resize': 'squash', 'resize_modes': ['squash', 'center_crop'], 'interpolation': 'bicubic',
            'reference_resize': 'center_crop'}


class BundleWriter:
    """``with BundleWriter(out) as w: export into w.path(name)...; w.commit(manifest)``."""

    def __init__(self, out_dir, overwrite: bool = False):
        self.out = Path(out_dir)
        self.overwrite = overwrite
        self.tmp = self.out.parent / f'.{self.out.name}.partial-{os.getpid()}'
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out}: already exists (pass --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def path(self, name: str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: dict) -> Path:
        files = {}
        for p in sorted(self.tmp.rglob('*')):
            if p.is_file():
                rel = p.relative_to(self.tmp).as_posix()
                files[rel] = {'size': p.stat().st_size, 'sha256': sha256_file(p)}
        manifest = {'format': FORMAT, 'format_version': FORMAT_VERSION,
                    'created_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                    **manifest, 'files': files}
        with open(self.tmp / MANIFEST, 'w', encoding='utf-8') as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if self.out.exists():
            old = self.out.parent / f'.{self.out.name}.old-{os.getpid()}'
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.out

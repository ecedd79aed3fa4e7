"""Writing a bundle atomically: files are staged in a hidden temporary directory beside the
target, hashed into the manifest, and the directory is renamed into place only when complete.
An export that fails part-way leaves the previous bundle (if any) untouched and no debris; the debris of
one that was killed goes with the next write to the same target. Only a bundle or an empty directory is
ever replaced."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


class BundleWriter:
    """``with BundleWriter(out) as w: export into w.path(name)...; w.commit(manifest)``."""

    def __init__(self, out_dir, overwrite: bool = False):
        self.out = Path(out_dir)
        self.overwrite = overwrite
        self.tmp = self.out.parent / f'.{self.out.name}.partial-{os.getpid()}'
        self.committed = False

    def check_target(self) -> None:
        """Only a bundle (a directory with a manifest) or an empty directory may be replaced."""
        if not (self.out.exists() or self.out.is_symlink()):
            return
        if not self.overwrite:
            raise FileExistsError(f"{self.out}: already exists (pass --overwrite to replace it)")
        if self.out.is_symlink() or not self.out.is_dir():
            raise FileExistsError(f"{self.out}: not a bundle directory (a file or a link): refusing to replace it")
        if not (self.out / MANIFEST).is_file() and any(self.out.iterdir()):
            raise FileExistsError(f"{self.out}: a directory that is not a bundle (no {MANIFEST}): "
                                  "refusing to replace it")

    def _remove_stale(self) -> None:
        """Staging directories of writes to the same target by processes that no longer run (killed)."""
        if os.name != 'posix':   # os.kill(pid, 0) would terminate the process elsewhere
            return
        pattern = re.compile(re.escape(f'.{self.out.name}.') + r'(partial|old)-(\d+)')
        for p in self.out.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if not m or int(m[2]) == os.getpid() or p.is_symlink() or not p.is_dir() or _alive(int(m[2])):
                continue
            # an old bundle moved aside is the only copy when its writer died before the new one took its place
            if m[1] == 'partial' or (self.out / MANIFEST).is_file():
                shutil.rmtree(p, ignore_errors=True)

    def __enter__(self) -> "BundleWriter":
        self.check_target()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
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
        self.check_target()
        old = None
        if self.out.exists():
            old = self.out.parent / f'.{self.out.name}.old-{os.getpid()}'
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.out

"""The artefact cache: compiled models keyed by everything that changes them, written atomically.

A key hashes the base weights' files, each LoRA's file with its scale and format, the backend,
the precision, the profile (sizes and batch axis), the versions of the backend and exporter, and
the device. Any change to those gives another key, so a stale artefact is never loaded; the same
inputs always give the same key, so `hypersd build-engine` (an init container) and a worker's
first load share one artefact.

An artefact is a folder. It is built under a temporary name in the cache folder and renamed into
place in one step, under an exclusive file lock: two processes building the same key at once
build it once, and a reader sees either no folder or a complete one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hypersd.registry import ModelSpec, format_size

CACHE_ENV = "HYPERSD_ENGINE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/hypersd/engines")
_CHUNK = 1 << 20
# Written last inside a finished artefact folder, before it is renamed into place.
KEY_FILE = "key.json"
# Another host's staging folder untouched for this long is a build that died (`_left_behind`).
_ABANDONED_AFTER_S = 24 * 3600


def cache_dir(folder: str | Path | None = None) -> Path:
    """The cache folder: `folder`, else `$HYPERSD_ENGINE_CACHE`, else ~/.cache/hypersd/engines.

    Args:
        folder: An explicit folder, or `None`.
    """
    chosen = folder or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def file_hash(path: Path) -> str:
    """The SHA-256 of a file's bytes.

    Args:
        path: The file.
    """
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(location: Path) -> Iterator[Path]:
    """The weight files under a diffusers folder (or the file itself), in a fixed order."""
    if location.is_file():
        yield location
        return
    for path in sorted(location.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".txt"):
            yield path


def weights_hash(spec: ModelSpec) -> str:
    """One hash of the base weights: folder or single file, plus the UNet override.

    Config and tokenizer files count as well: they change the model as much as its weights.
    A `hub_id` model is hashed from its local cache snapshot.

    Args:
        spec: The registry spec.
    """
    locations: list[Path] = []
    if spec.hub_id is not None:
        from huggingface_hub import snapshot_download

        locations.append(Path(snapshot_download(spec.hub_id, local_files_only=True)))
    locations += [path for path in (spec.path, spec.single_file, spec.unet) if path is not None]
    digest = hashlib.sha256()
    for location in locations:
        for path in _weight_files(location):
            # Relative names, so that the same model in another folder has the same key.
            digest.update(str(path.relative_to(location.parent)).encode())
            digest.update(file_hash(path).encode())
    return digest.hexdigest()


def artefact_key(
    spec: ModelSpec,
    *,
    backend: str,
    precision: str,
    device: str,
    versions: dict[str, str],
    base_hash: str | None = None,
    profile: dict[str, object] | None = None,
) -> str:
    """The cache key of `spec` built for `backend`: a hex string naming its artefact folder.

    Args:
        spec: The registry spec (base weights, LoRAs with scales, sizes).
        backend: The backend's name.
        precision: The weights' precision ("float32", "float16", ...).
        device: Where it runs: "cpu", or a GPU architecture for device-specific engines.
        versions: Versions of the backend and the exporter, by package name.
        base_hash: `weights_hash(spec)` when already known (hashing large weights takes time).
        profile: The shapes the artefact is built for, when they are more than its sizes with
            a dynamic batch axis (TensorRT's batch sizes and static profiles).
    """
    description = {
        "base": base_hash or weights_hash(spec),
        "loras": [
            {"hash": file_hash(lora.path), "scale": lora.scale, "format": lora.format}
            for lora in spec.loras
        ],
        "backend": backend,
        "precision": precision,
        # The profile: the sizes the artefact must serve; every export has a dynamic batch axis.
        "profile": profile
        or {"sizes": [format_size(size) for size in spec.sizes], "batch": "dynamic"},
        "versions": dict(sorted(versions.items())),
        "device": device,
    }
    text = json.dumps(description, sort_keys=True)
    return f"{spec.name}-{backend}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _left_behind(staging: Path, key: str) -> bool:
    """Whether a staging folder of `key` was left by a builder that is gone (killed by SIGKILL
    or the OOM killer), asked while holding the key's lock.

    A builder of this host would hold the lock, so this host's folders are all left behind. A
    volume shared between hosts may not carry locks across them (some NFS setups), so another
    host's folder may be a build in progress: it counts as left behind once untouched for a day.
    """
    host = staging.name.removeprefix(f".{key}.").rsplit(".", 1)[0]
    if host == socket.gethostname():
        return True
    return time.time() - staging.stat().st_mtime > _ABANDONED_AFTER_S


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block: processes that
    write one shared thing (an artefact, a timing cache) queue here.

    Args:
        path: The lock file, beside what it guards.
    """
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def get_or_build(root: Path, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The artefact folder of `key` under `root`, built by `build` if it is not there yet.

    Args:
        root: The cache folder (created if missing).
        key: The artefact's key (`artefact_key`).
        build: Writes the artefact into the empty folder it is given.

    Returns:
        The folder, and whether this call built it.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    if (final / KEY_FILE).is_file():
        return final, False
    # Builders of one key queue here; the second finds the first one's artefact.
    with exclusive_lock(root / f"{key}.lock"):
        if (final / KEY_FILE).is_file():
            return final, False
        for stale in root.glob(f".{key}.*"):
            if _left_behind(stale, key):
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.{socket.gethostname()}.", dir=root))
        try:
            build(staging)
            (staging / KEY_FILE).write_text(json.dumps({"key": key}))
            # mkdtemp makes the folder private; workers may run as another user than the builder
            # (an init container), and they only read it.
            staging.chmod(0o755)
            if final.exists():  # a folder without its key file is incomplete: not to be trusted
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final, True

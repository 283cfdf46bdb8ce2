"""Property-based tests (Hypothesis) of what loading promises: a mutated poison file, a strange
npz or image-folder dataset, a preset or an override either loads into something valid or gives
one ``ClpoisonError`` (never another exception), memory stays bounded by what the file holds,
and nothing is written outside the output. Examples are derandomised (the same in every run)
and few, so the suite costs about a minute."""

import io
import json
import resource
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clpoison.attacks import Poison, load_poison
from clpoison.cli import main
from clpoison.config import BOUNDS, load_config
from clpoison.data import load_dataset
from clpoison.errors import ClpoisonError
from clpoison.export import export_dataset

# Float strategies leave out subnormals: training runs flush them to zero process-wide
# (engine.setup_runtime), and Hypothesis refuses to draw them then.
FEW = settings(max_examples=40, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MB = 1024 * 1024


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: kB


def files_outside(root: Path, out: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and out not in p.parents}


# --- poison files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poison_bytes(small_cifar):
    train, _ = small_cifar
    p = Poison.for_dataset("sample", 8 / 255, train, generator=torch.Generator().manual_seed(0),
                           attack="cp-s", config={"data": {"dataset": "cifar10"}})
    with tempfile.TemporaryDirectory() as d:
        p.save(Path(d) / "p.safetensors")
        return (Path(d) / "p.safetensors").read_bytes()


def _header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    n, _ = _header(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


floats = st.floats(allow_nan=True, allow_subnormal=False)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                           | st.text(max_size=8) | floats,
                           lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 3_000_000)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 3_000_000), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("meta"), st.sampled_from(["shape", "kind", "epsilon", "format", "num_samples",
                                                "fingerprint", "config", "dataset"]), json_values),
    st.tuples(st.just("tensor"), st.sampled_from(["perturbation", "sample_indices"]),
              st.sampled_from(["F64", "I64", "U8", "BOOL", "F16"]),
              st.lists(st.integers(0, 300), max_size=4)),
)


def _mutate(data: bytes, m) -> bytes:
    kind = m[0]
    if kind == "truncate":
        return data[:m[1] % (len(data) + 1)]
    if kind == "flip":
        b = bytearray(data)
        for pos, x in m[1]:
            b[pos % len(b)] ^= x
        return bytes(b)
    n, header = _header(data)
    if kind == "meta":
        value = m[2] if isinstance(m[2], str) else json.dumps(m[2])
        header["__metadata__"][m[1]] = value
    else:                 # a tensor entry claiming another dtype and shape over the same bytes
        header[m[1]] = {**header[m[1]], "dtype": m[2], "shape": m[3]}
    return _with_header(data, header)


@FEW
@given(m=mutations)
def test_a_mutated_poison_file_loads_validly_or_is_one_error(poison_bytes, small_cifar, m):
    train, _ = small_cifar
    start = peak_rss()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.safetensors"
        path.write_bytes(_mutate(poison_bytes, m))
        try:
            poison = load_poison(path, dataset=train)
            poisoned = poison.poison_dataset(train)
        except ClpoisonError as e:
            assert "\n" not in str(e)
        else:
            assert poison.perturbation.abs().max() <= poison.epsilon * (1 + 1e-5) + 1e-7
            m8 = int(poison.epsilon * 255 + 1e-6)
            assert (poisoned.images.int() - train.images.int()).abs().max() <= m8
    assert peak_rss() - start < 256 * MB      # bounded by the ~2.5 MB file, not by its claims


# --- npz datasets ---------------------------------------------------------------------------
names = st.text(min_size=0, max_size=6)


@FEW
@given(n=st.integers(0, 6), labels=st.lists(st.integers(-3, 10**12), min_size=0, max_size=8),
       class_names=st.none() | st.lists(names, min_size=0, max_size=4),
       index=st.none() | st.lists(st.integers(-2, 10**15), max_size=8),
       shape=st.sampled_from([(8, 8, 3), (3, 8, 8), (8, 8), (8, 8, 2), (8, 3)]),
       dtype=st.sampled_from([np.uint8, np.float32, np.int64]))
def test_a_strange_npz_dataset_loads_validly_or_is_one_error(n, labels, class_names, index, shape,
                                                             dtype):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        arrays = {"x_train": np.zeros((n, *shape), dtype), "y_train": np.array(labels, np.int64),
                  "x_test": np.zeros((1, 8, 8, 3), np.uint8), "y_test": np.zeros(1, np.int64)}
        if class_names is not None:
            arrays["class_names"] = np.array(class_names, dtype=str)
        if index is not None:
            arrays["index_train"] = np.array(index, np.int64)
        np.savez(root / "d.npz", **arrays)
        start = peak_rss()
        try:
            train = load_dataset("npz", "train", root=root / "d.npz", cache_dir=root / "cache")
            test = load_dataset("npz", "test", root=root / "d.npz", cache_dir=root / "cache")
        except ClpoisonError as e:
            assert "\n" not in str(e)
            return
        assert peak_rss() - start < 256 * MB
        assert len(train) == len(labels) == n and train.labels.max() < train.num_classes
        out = root / "out" / "export"
        try:
            export_dataset(train, test, out, formats=("png",))
        except ClpoisonError:
            assert not (root / "out").exists()
        assert files_outside(root, out) == {root / "d.npz"} | set((root / "cache").rglob("*.*"))


# --- image folders --------------------------------------------------------------------------
folder_names = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                       min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@FEW
@given(files=st.lists(st.tuples(st.sampled_from(["train", "test", "other"]), folder_names,
                                folder_names, st.sampled_from([".png", ".jpg", ".txt", ""]),
                                st.booleans()), min_size=0, max_size=6))
def test_a_strange_image_folder_loads_validly_or_is_one_error(files):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        for i, (split, cls, name, ext, valid) in enumerate(files):
            folder = root / split / cls
            try:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{name}{i}{ext}").write_bytes(_png(i) if valid else b"not an image")
            except OSError:          # a name this file system refuses: not a dataset anyone has
                continue
        try:
            ds = load_dataset("imagefolder", "train", root=root, cache_dir=Path(d) / "cache")
        except ClpoisonError as e:
            assert "\n" not in str(e)
        else:
            assert len(ds) > 0 and ds.labels.max() < ds.num_classes


# --- presets and overrides ------------------------------------------------------------------
yaml_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6)
                           | st.floats(allow_nan=False, allow_subnormal=False) | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
sections = st.dictionaries(st.sampled_from(["data", "model", "train", "eval", "ssl", "augment",
                                            "attack", "per_algorithm", "defense", "nonsense"]),
                           yaml_values, max_size=4)


@FEW
@given(doc=st.one_of(yaml_values, sections))
def test_any_yaml_preset_loads_validly_or_is_one_error(doc):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            cfg = load_config(str(path), "simclr")
        except ClpoisonError as e:
            assert "\n" not in str(e)
        else:
            assert cfg.train.epochs >= 1 and cfg.train.batch_size >= 1 and cfg.train.lr > 0


keys = st.sampled_from(sorted(BOUNDS) + ["augment.scale", "defense.names", "attack.cp-s.rounds",
                                         "attack.epsilon", "data.dataset", "nonsense.key", "train"])
values = st.one_of(st.integers(-10**6, 10**6), floats, st.booleans(),
                   st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3))


@FEW
@given(pairs=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_any_override_gives_a_valid_config_or_one_error(pairs):
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in pairs]
    try:
        cfg = load_config("mini", "simclr", overrides)
    except ClpoisonError as e:
        assert "\n" not in str(e)
    else:
        for dotted, (low, low_ok, high) in BOUNDS.items():
            section, key = dotted.split(".")
            v = getattr(getattr(cfg, section), key)
            assert v is None or (v > low or (low_ok and v == low)) and (high is None or v <= high)


# --- the command line -------------------------------------------------------------------------
bad_settings = st.sampled_from(sorted(BOUNDS)).flatmap(
    lambda k: st.tuples(st.just(k), st.sampled_from(
        [BOUNDS[k][0] - 1, -1e9] + ([BOUNDS[k][2] + 1] if BOUNDS[k][2] is not None else [])
        + ([BOUNDS[k][0]] if not BOUNDS[k][1] else []))))


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_settings, command=st.sampled_from(["train", "story", "attack"]))
def test_the_cli_refuses_bad_settings_in_one_line_and_writes_nothing(bad, command, capsys):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        out = root / "runs" / ("p.safetensors" if command == "attack" else "run")
        argv = [command] + (["cp-s"] if command == "attack" else []) + [
            "--preset", "mini", "--set", f"{bad[0]}={bad[1]}", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("clpoison: error: ") and bad[0] in err
        assert list(root.iterdir()) == []

"""The device check's quick mode, as CI runs it on a CPU: every verb passes, the step benchmark and
the projection are filled in (scripts/gpu_check.sh runs the same script at full size on a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]


def test_quick_device_check(tmp_path):
    env = {**os.environ, "CLPOISON_DATA": str(SHARED), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick",
                           "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    verbs = {v["verb"]: v for v in report["verbs"]}
    assert {"train simclr", "train mocov2", "train byol", "train supervised", "attack cp-c",
            "attack cp-s", "attack ue-c", "attack ue-s", "attack ap", "attack random", "eval",
            "train simclr + matrix completion", "export", "show"} == set(verbs)
    assert all(v["error"] is None for v in verbs.values())
    assert (tmp_path / "runs" / "attack-cp-s" / "poison.safetensors").exists()
    bench = {r["case"]: r for r in report["bench"]}
    assert set(bench) == {"plain", "model", "noise-c", "noise-s"}
    assert bench["plain"]["x_plain"] == 1.0
    assert all(r["images_per_s"] > 0 and r["peak_mb"] > 0 for r in bench.values())
    hours = report["projected_hours"]
    assert set(hours) == {"victim_simclr_1000_epochs", "cp-c", "cp-s"}
    assert all(h > 0 for h in hours.values())
    assert "| noise-s |" in (tmp_path / "gpu_check.md").read_text()


def test_device_check_falls_back_to_random_images(tmp_path, monkeypatch):
    """Without CIFAR-10 (a GPU machine with no data) the check runs on random images of CIFAR's
    shape; with the full-data option it refuses instead."""
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("CLPOISON_DATA", str(tmp_path))
    monkeypatch.setenv("CLPOISON_CACHE", str(tmp_path / "cache"))
    train, test, data = gpu_check.datasets(64)
    assert data == "random images"
    assert train.images.shape == (64, 3, 32, 32) and train.images.dtype.is_floating_point is False
    assert sorted(set(train.labels.tolist())) == list(range(10)) and len(test) == 500
    with pytest.raises(Exception):
        gpu_check.datasets(None)

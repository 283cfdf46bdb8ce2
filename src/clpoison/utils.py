"""Small shared helpers: atomic file writes, safe path names, environment/version records,
seeding."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import filelock
import numpy as np
import torch
import torch.distributed as dist

import clpoison
from clpoison.errors import ClpoisonError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A killed process therefore never leaves a half-written file under the final name. Under
    torchrun only rank 0 writes: other ranks get a private temporary file that is thrown away
    (they run the same code; a barrier after the write lets them read what rank 0 wrote).
    """
    path = Path(path)
    if rank_and_world()[0] != 0:
        with tempfile.TemporaryDirectory(prefix="clpoison-rank-") as scratch:
            yield Path(scratch) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the final file the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun), known before the
    process group opens."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


LOCK_NAME = ".clpoison.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, is_file: bool | None = None) -> Iterator[None]:
    """One writer per output: an exclusive lock (``filelock``) held while the block runs, on
    ``out/.clpoison.lock`` for a folder (created when missing) or ``.NAME.lock`` beside a file.
    ``is_file`` says which ``out`` is (the caller knows; None: a name with a suffix is a file).
    The lock file holds the writer's pid and is removed on exit; a second writer gets a
    one-line error at once instead of interleaving with the first."""
    out = Path(out)
    if is_file is None:
        is_file = not out.is_dir() and bool(out.suffix)
    if out.exists() and out.is_dir() == is_file:
        raise ClpoisonError(f"--out {out} is a {'folder' if is_file else 'file'}; give a "
                            f"{'file name' if is_file else 'folder'} (new or existing)")
    lock_path = out.parent / f".{out.name}.lock" if is_file else out / LOCK_NAME
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            pid = lock_path.read_text().strip() or "?"
        except OSError:
            pid = "?"
        raise ClpoisonError(f"{out} is being written by another clpoison process (pid {pid}); "
                            f"wait for it to finish or choose another --out") from None
    try:
        lock_path.write_text(f"{os.getpid()}\n")
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        lock.release()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def safe_name(name: str, what: str) -> str:
    """``name`` if it can be one folder or file name inside an output folder: not empty, not
    ``.`` or ``..``, no path separator and no control character; else a one-line error naming
    ``what`` it is (e.g. "class name of cifar10"). Used for every name that comes from data or
    a command line and becomes a path."""
    if not isinstance(name, str) or name in ("", ".", "..") or _UNSAFE.search(name):
        raise ClpoisonError(f"{what} {name!r} cannot be a folder name (empty, '.', '..', a path "
                            f"separator or a control character); rename it")
    return name


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cpu_model() -> str:
    """The CPU's model name (other CPUs run other bf16 kernels: results differ as by a seed)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of everything that can change a result, the machine's CPU (and GPU) model and
    the number of processes, recorded in every run."""
    out = {
        "clpoison": clpoison.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "world_size": str(rank_and_world()[1]),
    }
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

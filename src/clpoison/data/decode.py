"""Decoding many small encoded images (PNG/JPEG bytes) into one uint8 array with Pillow.

For tiny images (CIFAR's 32x32 JPEGs) Pillow's Python-level header parsing costs ~5x the actual
decode, so baseline/progressive 3-component JPEGs take a fast path: the libjpeg decoder that
``Image.open(...).load()`` would use is driven directly, writing each image into its own rows of
one tall strip image. It is self-checked against ``Image.open`` on the first image, and any image
it does not handle cleanly (other JPEG kinds, PNG, errors) goes through plain ``Image.open``.
Both paths produce identical pixels (same decoder, same settings).
"""

from __future__ import annotations

import io
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from clpoison.errors import ClpoisonError

_STRIP = 2048  # images per strip (tall image) in the fast path

# SOF markers the fast path handles: baseline, extended sequential, progressive (Huffman).
_FAST_SOF = (0xC0, 0xC1, 0xC2)


def _jpeg_header(b: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) of a JPEG the fast path can take, else None."""
    if b[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(b)
    while i + 9 < n:
        if b[i] != 0xFF:
            return None
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _FAST_SOF:
            return (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8], b[i + 9]
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            return None  # lossless / arithmetic-coded / hierarchical: slow path
        if m in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
            continue
        i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def _fast_available() -> bool:
    return hasattr(Image, "_getdecoder") and hasattr(Image.core, "jpeg_decoder")


def _fast_decode_into(strip: Image.Image, row: int, h: int, w: int, blob: bytes) -> bool:
    """Decode ``blob`` into rows ``[row*h, (row+1)*h)`` of ``strip``; False if not done cleanly."""
    try:
        decoder = Image._getdecoder("RGB", "jpeg", ("RGB", ""))
        try:
            decoder.setimage(strip.im, (0, row * h, w, row * h + h))
            consumed, err = decoder.decode(blob)
        finally:
            decoder.cleanup()
    except Exception:  # noqa: BLE001 - any trouble: let the slow path decide (and report)
        return False
    return consumed < 0 and err >= 0


def decode_one(blob: bytes, label: str) -> np.ndarray:
    """Decode one image to a (H, W, 3) uint8 RGB array; grey/RGBA/palette are converted to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency chatter
            with Image.open(io.BytesIO(blob)) as im:
                im.load()
                if im.mode != "RGB":
                    if im.mode in ("P", "PA", "LA") or "transparency" in im.info:
                        im = im.convert("RGBA")
                    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                        raise ClpoisonError(f"image {label} has a high bit depth ({im.mode}); clpoison reads "
                                            "8-bit images only: convert it to 8-bit RGB/grey PNG or JPEG")
                    im = im.convert("RGB")
                return np.asarray(im, dtype=np.uint8).copy()
    except ClpoisonError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ClpoisonError(f"cannot decode image {label} ({what}); replace or delete that file") from None


def _size_error(label: str, got: tuple[int, int], ref_label: str, ref: tuple[int, int]) -> ClpoisonError:
    return ClpoisonError(f"image {label} is {got[1]}x{got[0]} (WxH) but {ref_label} is {ref[1]}x{ref[0]}; "
                         "all images of a dataset must have the same size and clpoison does not resize: "
                         "resize or remove the odd images")


def decode_images(blobs: Sequence[bytes], labels: Sequence[str], fast: bool = True,
                  like: tuple[str, tuple[int, int]] | None = None) -> np.ndarray:
    """Decode encoded images to one ``(N, H, W, 3)`` uint8 RGB array (all must share one size).

    ``labels`` name each blob (file/member path) for error messages. ``like``: ``(label, (H,
    W))`` of an image decoded earlier that these must also match (blocks of one dataset).
    """
    n = len(blobs)
    if n == 0:
        raise ClpoisonError("no images to decode")
    first = decode_one(blobs[0], labels[0])
    h, w = first.shape[:2]
    if like is not None and (h, w) != tuple(like[1]):
        raise _size_error(labels[0], (h, w), like[0], like[1])
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    out[0] = first

    use_fast = fast and _fast_available()
    if use_fast:  # self-check: the fast path must reproduce Image.open exactly
        hdr = _jpeg_header(blobs[0])
        if hdr is not None:
            probe = Image.new("RGB", (w, h))
            use_fast = (hdr == (h, w, 3) and _fast_decode_into(probe, 0, h, w, blobs[0])
                        and np.array_equal(np.asarray(probe), first))

    slow: list[int] = []
    for start in range(1, n, _STRIP):
        stop = min(start + _STRIP, n)
        if not use_fast:
            slow.extend(range(start, stop))
            continue
        strip = Image.new("RGB", (w, h * (stop - start)))
        done = np.zeros(stop - start, dtype=bool)
        for j in range(start, stop):
            blob = blobs[j]
            if _jpeg_header(blob) == (h, w, 3) and _fast_decode_into(strip, j - start, h, w, blob):
                done[j - start] = True
            else:
                slow.append(j)
        if done.any():
            arr = np.asarray(strip).reshape(stop - start, h, w, 3)
            out[start:stop][done] = arr[done]

    for j in slow:
        img = decode_one(blobs[j], labels[j])
        if img.shape[:2] != (h, w):
            raise _size_error(labels[j], img.shape[:2], labels[0], (h, w))
        out[j] = img
    return out


def default_workers() -> int:
    """Threads for decoding: the CPUs this process may use, at most 8 (Pillow releases the GIL)."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))


def decode_in_blocks(read: Callable[[int], bytes], labels: Sequence[str], block: int = 128,
                     workers: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """Decode images ``0 .. len(labels) - 1`` in order, ``block`` at a time, yielding ``(start,
    (k, H, W, 3) uint8)``; every image must have the first one's size.

    ``read(i)`` returns the encoded bytes of image ``i`` (``labels[i]`` names it in errors). With
    ``workers`` > 1, blocks are read and decoded in threads, at most ``2 * workers`` ahead of the
    consumer, so memory stays bounded by that window whatever the number of images. Pixels equal
    ``decode_images`` on all the blobs at once.
    """
    n, workers = len(labels), max(1, workers)
    if n == 0:
        raise ClpoisonError("no images to decode")

    def job(start: int, like: tuple[str, tuple[int, int]]) -> np.ndarray:
        stop = min(start + block, n)
        return decode_images([read(i) for i in range(start, stop)], labels[start:stop], like=like)

    like = (labels[0], decode_one(read(0), labels[0]).shape[:2])  # the size every block must have
    starts = iter(range(0, n, block))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        ahead = range(2 * workers)   # first in zip: no start is drawn and dropped
        pending = deque((s, pool.submit(job, s, like)) for _, s in zip(ahead, starts))
        while pending:
            start, future = pending.popleft()
            hwc = future.result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(job, nxt, like)))
            yield start, hwc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

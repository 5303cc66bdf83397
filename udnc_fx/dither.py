"""The dither generator: a stateless, counter-based integer hash (a format-level contract).

Encoder and decoder share the dither through a key, so a compressed model stores a key, never the dither. The
stream must be reproduced bit for bit by NumPy, PyTorch and an ONNX graph run by onnxruntime, on any machine, so it
uses only 32-bit unsigned Add/Mul (wrapping), BitShift and BitwiseXor: operations all three have. Element ``i`` of
the stream with key ``k`` depends on ``(k, i)`` alone, so any slice can be regenerated independently.

Definition (generator id ``udnc-hash32-v1``; all arithmetic modulo 2**32)::

    fmix32(h):  h ^= h >> 16;  h *= 0x85EBCA6B;  h ^= h >> 13;  h *= 0xC2B2AE35;  h ^= h >> 16
    k0, k1 = key & 0xFFFFFFFF, key >> 32                  # key is a uint64
    a = fmix32(k0 ^ 0x9E3779B9)                           # whitened key words: neighbouring keys
    b = fmix32(k1 ^ 0x7F4A7C15 ^ a)                       #   give unrelated streams
    h_i = fmix32(fmix32(i ^ a) ^ b)                       # i = 0, 1, ... (uint32 counter)
    r_i = (h_i >> 8) * 2**-24                             # in [0, 1), exact in float32 and float64

``fmix32`` is MurmurHash3's finaliser (full avalanche); applying it twice with two key words removes the
structure a single keyed permutation leaves between neighbouring counters and keys.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from .errors import ConfigError

__all__ = [
    "DITHER_ID",
    "MAX_COUNT",
    "FMIX_MULTIPLIERS",
    "KEY_WHITENERS",
    "tensor_key",
    "key_words",
    "fmix32_np",
    "hash_stream_np",
    "uniform_np",
    "uniform_torch",
    "native",
]

DITHER_ID = "udnc-hash32-v1"
MAX_COUNT = 2**32  # the counter is 32 bits: a tensor's dither may have at most 2**32 elements
_M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35
_KA, _KB = 0x9E3779B9, 0x7F4A7C15
#: ``fmix32``'s two multipliers, for the twins of this generator in other runtimes (the ONNX graph).
FMIX_MULTIPLIERS = (_C1, _C2)
#: The constants XORed into the key words (``a = fmix32(k0 ^ KA)``, ``b = fmix32(k1 ^ KB ^ a)``), for the twins.
KEY_WHITENERS = (_KA, _KB)


def tensor_key(seed: int, fqn: str) -> int:
    """Derive the per-tensor uint64 key from the user's seed and the tensor's fully qualified name.

    ``blake2b(b"udnc-key-v1\\0" + seed as 8 little-endian bytes + fqn as UTF-8, digest_size=8)`` read as a
    little-endian uint64. Two tensors (different fqns) never share a stream, and nearby seeds give unrelated keys.

    Raises:
        ConfigError: if ``seed`` is not an integer in ``[0, 2**64)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    digest = hashlib.blake2b(
        b"udnc-key-v1\0" + int(seed).to_bytes(8, "little") + fqn.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * _C1) & _M32
    h ^= h >> 13
    h = (h * _C2) & _M32
    h ^= h >> 16
    return h


def key_words(key: int) -> tuple[int, int]:
    """The whitened key words ``(a, b)`` of the definition (Python ints < 2**32)."""
    if not 0 <= int(key) < 2**64:
        raise ConfigError(f"dither key must be a uint64, got {key!r}")
    key = int(key)
    a = _fmix32_int((key & _M32) ^ _KA)
    b = _fmix32_int((key >> 32) ^ _KB ^ a)
    return a, b


_NATIVE: list = []  # [module or None] once loaded

#: Below this many elements a call keeps to NumPy unless the kernels are already loaded: importing numba and
#: loading the compiled kernels costs about a second once per process, which a small model would not win back.
NATIVE_MIN_ELEMENTS = 1 << 22


def _load():
    if not _NATIVE:
        try:
            from . import kernels as module  # noqa: PLC0415
        except ImportError:  # numba is not installed (or not for this Python): NumPy only
            module = None
        except Exception as exc:  # noqa: BLE001 -- e.g. numba finds no writable cache folder: NumPy, same bits
            import warnings  # noqa: PLC0415

            warnings.warn(f"udnc_fx: native kernels unavailable ({exc}); using NumPy (same results, slower)",
                          RuntimeWarning, stacklevel=3)
            module = None
        _NATIVE.append(module)
    return _NATIVE[0]


def native(size: int | None = None):
    """The numba kernels (:mod:`udnc_fx.kernels`) for a piece of work of ``size`` elements, or ``None`` for the
    NumPy path, which gives the same bits (tested).

    The environment variable ``UDNC_NATIVE`` decides: ``0`` never, ``1`` always (the kernels are loaded on first
    use), unset (or anything else) when numba is installed and either the kernels are already loaded or ``size`` is
    at least :data:`NATIVE_MIN_ELEMENTS` (``None``: only when already loaded).
    """
    mode = os.environ.get("UDNC_NATIVE", "")
    if mode == "0":
        return None
    if _NATIVE or mode == "1" or (size is not None and size >= NATIVE_MIN_ELEMENTS):
        return _load()
    return None


def _use_native(flag: bool | None, size: int):
    """The kernels for ``flag``: ``None``: :func:`native`'s rule; ``False``: never; ``True``: always (a
    ``ConfigError`` without numba)."""
    if flag is None:
        return native(size)
    if not flag:
        return None
    k = _load()
    if k is None:
        raise ConfigError("the native kernels need numba (pip install numba)")
    return k


def _check_range(start: int, count: int) -> None:
    if count < 0 or start < 0 or start + count > MAX_COUNT:
        raise ConfigError(f"dither range [{start}, {start + count}) is outside the 32-bit counter space")


def fmix32_np(h: np.ndarray, *, native: bool | None = None) -> np.ndarray:
    """The definition's ``fmix32`` finaliser on a uint32 array, in place (also returned).

    The ANS coder's dither contexts hash their own counters with it (``udnc_fx.coding.ans.dither_codes``).
    ``native``: use the numba kernel (``None``: when available, and ``h`` is a contiguous uint32 array).
    """
    k = _use_native(native, h.size)
    if k is not None and isinstance(h, np.ndarray) and h.dtype == np.uint32 and h.flags.c_contiguous:
        k.fmix_inplace(h.reshape(-1))
        return h
    # uint32 array arithmetic wraps modulo 2**32 (what the definition asks); in-place to spare memory.
    h ^= h >> np.uint32(16)
    h *= np.uint32(_C1)
    h ^= h >> np.uint32(13)
    h *= np.uint32(_C2)
    h ^= h >> np.uint32(16)
    return h


def hash_stream_np(key: int, count: int, start: int = 0, *, native: bool | None = None) -> np.ndarray:
    """Hash values ``h_i`` for ``i`` in ``[start, start + count)`` as a uint32 array.

    ``native``: compute with the numba kernel (one pass; ``None``: when available) or with NumPy (``False``): the
    same bits.
    """
    _check_range(start, count)
    a, b = key_words(key)
    k = _use_native(native, count)
    if k is not None:
        out = np.empty(count, np.uint32)
        k.hash_fill(np.uint64(a), np.uint64(b), np.uint64(start), out)
        return out
    h = np.arange(start, start + count, dtype=np.uint64).astype(np.uint32)
    h ^= np.uint32(a)
    h = fmix32_np(h, native=False)
    h ^= np.uint32(b)
    return fmix32_np(h, native=False)


def uniform_np(key: int, count: int, start: int = 0, dtype=np.float64, *, native: bool | None = None) -> np.ndarray:
    """Uniform floats ``r_i`` in ``[0, 1)`` (top 24 bits of the hash, exact in float32 and float64).

    ``native``: as :func:`hash_stream_np`.
    """
    k = _use_native(native, count)
    if k is not None and np.dtype(dtype) in (np.dtype(np.float32), np.dtype(np.float64)):
        _check_range(start, count)
        a, b = key_words(key)
        out = np.empty(count, dtype)
        k.uniform_fill(np.uint64(a), np.uint64(b), np.uint64(start), out)
        return out
    h = hash_stream_np(key, count, start, native=False)
    return (h >> np.uint32(8)).astype(dtype) * dtype(2.0**-24)


def _mul32_torch(x, c: int):
    # x holds uint32 values in int64. x * c can exceed int64, so multiply by c's 16-bit halves: each partial
    # product stays below 2**48, and the high half only matters modulo 2**16 once shifted.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32_torch(h):
    h = h ^ (h >> 16)
    h = _mul32_torch(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32_torch(h, _C2)
    return h ^ (h >> 16)


def uniform_torch(key: int, count: int, start: int = 0, *, device=None, dtype=None):
    """PyTorch twin of :func:`uniform_np`, bit-exact with it, computed on ``device``.

    ``torch.uint32`` lacks shift kernels, so the hash runs on int64 holding 32-bit values, masked after each
    multiplication.
    """
    import torch

    _check_range(start, count)
    a, b = key_words(key)
    dtype = dtype or torch.float64
    h = torch.arange(start, start + count, dtype=torch.int64, device=device)
    h = _fmix32_torch(h ^ a)
    h = _fmix32_torch(h ^ b)
    return (h >> 8).to(dtype) * (2.0**-24)

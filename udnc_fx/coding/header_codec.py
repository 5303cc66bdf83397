"""The compressed header of format 1.5: ``udnc-hcm-v1``, a bitwise context-mixing coder for the canonical JSON.

On a model of a few ten thousand weights the JSON header is 10-25 % of the file (the pruned demo CNN: 916 of 4206
bytes). General-purpose compressors would shrink it, but their output may differ between library builds (zlib,
zlib-ng), and a ``.udnc`` writer must give the same bytes on every machine. This coder is defined here and in
``docs/FORMAT.md`` (*Compressed header*) with integer arithmetic only, so any implementation gives the same bytes.

The model (everything an independent decoder needs is in ``docs/FORMAT.md``): each byte is coded as 8 binary
decisions, most significant bit first. Six context models (orders 0, 1, 2, 3, 4 and 6: the last 0-6 bytes, with
the bits of the current byte seen so far) each predict the next bit with an adaptive probability; a logistic mixer
(weights chosen by the order-0 context, trained online) combines them; a 32-bit binary arithmetic coder codes the
bit. Before the header, the model is *primed* with :data:`PRIMER`, a fixed text of the format's own keys and common
layer names, so that even a 600-byte header starts with a model that knows ``"alphabet_size"``.

One kernel (:func:`_code`) runs the model for both directions, so the encoder and decoder cannot drift apart. It is
compiled by numba (the project already compiles its rANS kernels); ``_code.py_func`` is the same code run by the
Python interpreter, which the tests compare against the compiled one.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from udnc_fx.coding.coder_base import read_varint, varint
from udnc_fx.errors import FormatError

__all__ = ["MARKER", "METHOD", "PRIMER", "compress_header", "decompress_header", "is_compressed"]

#: First byte of a compressed header: no JSON text starts with it (a JSON header starts with ``{`` or whitespace).
MARKER = 0x00
#: The method byte that follows: 1 = ``udnc-hcm-v1``.
METHOD = 0x01

#: Context orders (bytes of history) of the six models (order 0: the bits of the current byte only).
ORDERS = (0, 1, 2, 3, 4, 6)
#: Each model's table has 2^b slots, b = table_bits(L) for a JSON of L bytes: 2^16 for headers under 1 KiB (6 x 192
#: KiB of tables), up to 2^20 from 16 KiB on (fewer collisions where there is more to learn).
MIN_TABLE_BITS, MAX_TABLE_BITS = 16, 20


def table_bits(length: int) -> int:
    """log2 of the slots per model for a JSON of ``length`` bytes: ``min(20, max(16, bit_length(length) + 6))``."""
    return min(MAX_TABLE_BITS, max(MIN_TABLE_BITS, int(length).bit_length() + 6))


#: A counter's adaptation rate is 1/(n + 1.5) for its first LIMIT updates, then 1/(LIMIT + 1.5).
LIMIT = 30
#: Mixer learning rate and initial weight (16.16 fixed point).
MIXER_RATE = 4
MIXER_INIT = 22000
#: Weight clamp (16.16): a weight stays in [-W_MAX, W_MAX].
W_MAX = 1 << 20

#: Fed through the model before the header (updates only, nothing coded): the format's keys and values, and common
#: layer names. Part of the format: it never changes for ``udnc-hcm-v1``.
PRIMER = (
    b'{"codebook_encoding":"lattice-int","coder":"ans-dither-v2","config":{"fallback":"module_swap",'
    b'"leaf_modules":[]},"metadata":{"huggingface":{"architecture":"BertModel","config":{},'
    b'"transformers_version":"4.0"},"udnc_cli":{"fold_bn":true}},"quantized":[{"codebook":{"a":1.0,"b":-0.5,'
    b'"encoding":"affine","points":{"encoding":"lattice-coords","exact_zero":true,"layout":"interleaved"}},'
    b'"dither":"none","fqn":"conv1.weight","indices":{"alphabet_size":7,"coder":"range-context-v1","length":100},'
    b'"key":"0123456789abcdef","lattice":"E8","meta":{"aliases":["lm_head.weight"]},"n":8,"shape":[64,3,7,7],'
    b'"step":0.01,"zero_index":0},{"codebook":{"alphabet_size":50,"encoding":"lattice-int-coded","length":20},'
    b'"fqn":"encoder.layer.0.attention.self.query.weight","indices":{"alphabet_size":30,"coder":"ans-dither-v1",'
    b'"length":5000},"lattice":"D4","shape":[768,768],"step":0.02},{"codebook":{"encoding":"lattice-int",'
    b'"width":2},"fqn":"layer1.0.bn2.weight","indices":{"alphabet_size":12,"length":300},"lattice":"A2",'
    b'"shape":[256,128,3,3],"step":0.5},{"codebook":{"encoding":"f16"},"fqn":"layers.1.mlp.fc1.weight",'
    b'"indices":{"alphabet_size":5,"coder":"range-adaptive-v1","length":10},"shape":[3072,768],"step":1.5},'
    b'{"codebook":{"encoding":"f32"},"fqn":"model.decoder.layers.2.self_attn.out_proj.weight","indices":'
    b'{"alphabet_size":100,"length":2000},"layout":"split-u","shape":[512,512],"step":0.25}],'
    b'"raw":[["conv1.bias",[64]],["embeddings.LayerNorm.weight",[768]],["bn1.num_batches_tracked",[],"int64"],'
    b'["features.0.running_mean",[32],"float16"]],"raw_float16":true,"seed":1}'
)

# ---------------------------------------------------------------------------------------------------------------
# Fixed tables: squash (logistic), stretch (its inverse), counter rates
# ---------------------------------------------------------------------------------------------------------------

_SQUASH_POINTS = np.array(
    [1, 2, 3, 6, 10, 16, 27, 45, 73, 120, 194, 310, 488, 747, 1101, 1546, 2047, 2549, 2994, 3348, 3607, 3785, 3901,
     3975, 4022, 4050, 4068, 4079, 4085, 4089, 4092, 4093, 4094], np.int64
)


def _squash_py(d: int) -> int:
    """4096 / (1 + e^(-d/256)), interpolated between 33 points (integers only)."""
    if d > 2047:
        return 4095
    if d < -2047:
        return 0
    w = d & 127
    i = (d >> 7) + 16
    return int((_SQUASH_POINTS[i] * (128 - w) + _SQUASH_POINTS[i + 1] * w + 64) >> 7)


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    squash = np.array([_squash_py(d) for d in range(-2047, 2048)], np.int64)  # index d + 2047
    stretch = np.empty(4096, np.int64)
    pi = 0
    for x in range(-2047, 2048):
        v = _squash_py(x)
        stretch[pi : v + 1] = x
        pi = max(pi, v + 1)
    stretch[pi:] = 2047
    rates = np.array([131072 // (2 * n + 3) for n in range(LIMIT + 1)], np.int64)
    return squash, stretch, rates


SQUASH, STRETCH, RATES = _tables()

# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_NMODELS = len(ORDERS)
_ORDERS = np.array(ORDERS, np.int64)

# error codes of _code
_OK = 0
_ERR_OVERRUN = 1  # the decoder would read more than the stream's bytes


@njit(cache=True, nogil=True)
def _code(decode, data, n_out, stream, probs, counts, weights, history, squash, stretch, rates, orders,
          table_bits, limit, rate, w_max, out):
    """One pass of the model, in one of three ways: priming (``decode=False``, ``stream`` empty: the model learns
    ``data``, nothing is coded), encoding (``decode=False``: ``data`` coded into ``stream``, a buffer large enough)
    or decoding (``decode=True``: ``n_out`` bytes from ``stream`` into ``out``; the other arrays are uint8).

    State (``probs``, ``counts``: ``(models, 2^table_bits)``; ``weights``: ``(256, models)``; ``history``: the last 8
    bytes, newest first) is updated in place, so priming leaves the state the header starts from.
    Returns ``(error, bytes written or read)``."""
    nm = orders.shape[0]
    shift = 32 - table_bits
    x1 = 0
    x2 = 0xFFFFFFFF
    x = 0
    pos = 0  # stream bytes written (encode) or read (decode)
    coding = stream.shape[0] > 0 or decode
    if decode:
        for _ in range(4):
            x = (x << 8) | (int(stream[pos]) if pos < stream.shape[0] else 255)
            pos += 1
    hashes = np.zeros(nm, np.int64)
    idx = np.zeros(nm, np.int64)
    st = np.zeros(nm, np.int64)
    total = n_out if decode else data.shape[0]
    written = 0
    for k in range(total):
        # the models' contexts of this byte: a hash of the last `order` bytes
        for m in range(nm):
            h = orders[m]
            for j in range(orders[m]):
                h = ((h * 16777619) ^ history[j]) & 0xFFFFFFFF
            hashes[m] = h
        byte = 0 if decode else int(data[k])
        c0 = 1
        for b in range(7, -1, -1):
            dot = 0
            for m in range(nm):
                t = ((hashes[m] ^ (c0 * 0x9E3779B1)) & 0xFFFFFFFF) * 0x2545F491 & 0xFFFFFFFF
                idx[m] = t >> shift
                st[m] = stretch[int(probs[m, idx[m]]) >> 4]
                dot += weights[c0, m] * st[m]
            d = dot >> 16
            if d > 2047:
                d = 2047
            elif d < -2047:
                d = -2047
            p = squash[d + 2047]
            pc = p
            if pc < 1:
                pc = 1
            elif pc > 4095:
                pc = 4095
            xmid = x1 + (x2 - x1 >> 12) * pc
            if decode:
                y = 1 if x <= xmid else 0
            else:
                y = (byte >> b) & 1
            if y:
                x2 = xmid
            else:
                x1 = xmid + 1
            if coding:
                while ((x1 ^ x2) & 0xFF000000) == 0:
                    if decode:
                        if pos >= stream.shape[0] + 3:
                            return _ERR_OVERRUN, pos
                        x = ((x << 8) & 0xFFFFFFFF) | (int(stream[pos]) if pos < stream.shape[0] else 255)
                    else:
                        if pos >= stream.shape[0]:
                            return _ERR_OVERRUN, pos
                        stream[pos] = x2 >> 24
                    pos += 1
                    x1 = (x1 << 8) & 0xFFFFFFFF
                    x2 = ((x2 << 8) & 0xFFFFFFFF) | 255
            # learn
            err = ((y << 12) - p) * rate
            for m in range(nm):
                w = weights[c0, m] + ((st[m] * err + 512) >> 10)
                if w > w_max:
                    w = w_max
                elif w < -w_max:
                    w = -w_max
                weights[c0, m] = w
                i = idx[m]
                n = int(counts[m, i])
                q = int(probs[m, i])
                probs[m, i] = q + ((((y << 16) - q) * rates[n]) >> 16)
                if n < limit:
                    counts[m, i] = n + 1
            c0 = (c0 << 1) | y
        byte = c0 & 255
        if decode:
            out[k] = byte
        for j in range(history.shape[0] - 1, 0, -1):
            history[j] = history[j - 1]
        history[0] = byte
    if coding and not decode:
        if pos >= stream.shape[0]:
            return _ERR_OVERRUN, pos
        stream[pos] = x1 >> 24  # flush: the first byte where x1 and x2 differ
        pos += 1
    if decode:
        # the encoder wrote one byte per shift plus the flush byte x1 >> 24; the decoder read 4 bytes ahead
        return (_OK if pos == stream.shape[0] + 3 and int(stream[stream.shape[0] - 1]) == (x1 >> 24) else 2), pos
    return _OK, pos


def _primed_state(length: int, kernel=None) -> tuple[np.ndarray, ...]:
    """The model's state after :data:`PRIMER`, with the tables sized for a JSON of ``length`` bytes (priming takes
    about a millisecond: cheaper than keeping a copy per table size)."""
    kernel = kernel or _code
    bits = table_bits(length)
    probs = np.full((_NMODELS, 1 << bits), 1 << 15, np.uint16)  # q: 16 bits; n: at most LIMIT
    counts = np.zeros((_NMODELS, 1 << bits), np.uint8)
    weights = np.full((256, _NMODELS), MIXER_INIT, np.int64)
    history = np.zeros(8, np.int64)
    state = (probs, counts, weights, history)
    kernel(False, _PRIMER_VALUES, 0, _EMPTY, *state, SQUASH, STRETCH, RATES, _ORDERS, bits, LIMIT, MIXER_RATE, W_MAX,
           _EMPTY)
    return state


_PRIMER_VALUES = np.frombuffer(PRIMER, np.uint8).copy()  # writable: one compiled signature for all calls
_EMPTY = np.zeros(0, np.uint8)


def _encode(data: bytes, kernel=None) -> bytes:
    """The coded stream of ``data`` (no framing)."""
    kernel = kernel or _code
    state = _primed_state(len(data), kernel)
    # each bit costs at most 12 bits (p' >= 1/4096) plus the flush: 12 bytes per input byte bound the stream
    buffer = np.zeros(12 * len(data) + 8, np.uint8)
    values = np.frombuffer(data, np.uint8).copy()
    err, n = kernel(False, values, 0, buffer, *state, SQUASH, STRETCH, RATES, _ORDERS, table_bits(len(data)), LIMIT,
                    MIXER_RATE, W_MAX, _EMPTY)
    if err != _OK:  # cannot happen: bits with p >= 1/4096 cost at most 12 bits; kept as a guard
        raise FormatError("bad_value", "the header coder's output overran its buffer")
    return buffer[:n].tobytes()


def _decode(stream: bytes, length: int, kernel=None) -> bytes:
    kernel = kernel or _code
    state = _primed_state(length, kernel)
    out = np.zeros(length, np.uint8)
    values = np.frombuffer(stream, np.uint8).copy()
    err, _ = kernel(True, _EMPTY, length, values, *state, SQUASH, STRETCH, RATES, _ORDERS, table_bits(length), LIMIT,
                    MIXER_RATE, W_MAX, out)
    if err != _OK:
        raise FormatError(
            "bad_header", "the compressed header's stream does not hold exactly its declared length (corrupt stream)"
        )
    return out.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------------------------


def is_compressed(stored: bytes) -> bool:
    """Whether a stored header is the compressed form (its first byte is :data:`MARKER`)."""
    return len(stored) > 0 and stored[0] == MARKER


def compress_header(json_bytes: bytes) -> bytes:
    """The compressed form of a header: ``MARKER``, ``METHOD``, the JSON's length (varint), the coded stream.
    Writers store it only when it is shorter than ``json_bytes``."""
    if not json_bytes:
        raise FormatError("bad_value", "an empty header cannot be compressed")
    return bytes([MARKER, METHOD]) + varint(len(json_bytes)) + _encode(json_bytes)


def decompress_header(stored: bytes, max_length: int) -> bytes:
    """The JSON bytes of a stored header (as is when it is not compressed).

    Raises:
        FormatError: ``unknown_codec`` for an unknown method byte; ``bad_value`` for a declared length over
            ``max_length`` (checked before anything is decoded); ``bad_header`` for a malformed frame or a stream that
            does not decode to exactly its declared length.
    """
    if not is_compressed(stored):
        return stored
    if len(stored) < 2:
        raise FormatError("bad_header", "the compressed header ends before its method byte")
    if stored[1] != METHOD:
        raise FormatError("unknown_codec", f"unknown header compression method {stored[1]}")
    try:
        length, pos = read_varint(memoryview(stored), 2)
    except FormatError as exc:
        raise FormatError("bad_header", f"the compressed header's length: {exc}") from None
    if length < 1:
        raise FormatError("bad_header", "the compressed header declares an empty header")
    if length > max_length:
        raise FormatError(
            "bad_value",
            f"the header decompresses to {length} bytes, more than this reader's limit of {max_length} "
            "(max_header_length)",
        )
    if pos >= len(stored):
        raise FormatError("bad_header", "the compressed header has no stream")
    return _decode(stored[pos:], length)

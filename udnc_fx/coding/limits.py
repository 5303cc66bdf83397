"""Reader-side limits that bound the work a hostile ``.udnc`` file can cause (NumPy-free, no torch).

A container's declared sizes are the only thing that can make a reader allocate or loop: the header's length, each
tensor's shape (how many indices a stream decodes to) and each alphabet (how big an adaptive model is). The file's
byte count cannot bound the first two -- an adaptive range coder codes a constant stream of 2^28 symbols in a few
bytes, and that is a valid file -- so the defences are:

- with a model (:func:`udnc_fx.load`): every declared name, shape and dtype must be the model's *before* any stream
  is decoded, and the header and payload may only be as large as a file of that model can be
  (:func:`header_allowance`, :func:`payload_allowance`);
- without a model (``read_header``, ``size_report``, ``udnc inspect``): nothing is decoded, and the header itself is
  capped (:data:`DEFAULT_MAX_HEADER_LENGTH`: parsing costs about 1 µs and 90 bytes of memory per header byte); a
  compressed header (format 1.5) is capped twice, stored and decompressed, the latter before it is decoded (about
  3 µs per decompressed byte);
- for every coder: an alphabet may exceed its stream's length by at most :data:`ALPHABET_SLACK`
  (:func:`max_index_alphabet`, the rule the writer obeys too), because an adaptive model costs O(K) per block
  whatever the stream holds; and a decoder must consume its payload exactly (``Coder.decode``'s contract, tested for
  every registered coder).
"""

from __future__ import annotations

__all__ = [
    "MAX_HEADER_LENGTH",
    "DEFAULT_MAX_HEADER_LENGTH",
    "ALPHABET_SLACK",
    "max_index_alphabet",
    "max_codebook_alphabet",
    "header_allowance",
    "payload_allowance",
]

#: The format's ceiling on the JSON header (docs/FORMAT.md: ``1 <= H <= 64 MiB``).
MAX_HEADER_LENGTH = 64 << 20
#: What readers accept by default when no model bounds the header: 4 MiB holds the entries of some 25,000 tensors
#: (a 7B-parameter transformer has under 300), and parses in about 4 s at under 0.4 GB. Pass ``max_header_length``
#: (up to :data:`MAX_HEADER_LENGTH`) to read a larger one.
DEFAULT_MAX_HEADER_LENGTH = 4 << 20
#: How far an alphabet may exceed the number of symbols coded with it. A codebook holds the lattice points a
#: layer uses, so K <= count in every file udnc-fx writes; the slack leaves room for unused codewords on small
#: layers while keeping an adaptive model's O(K)-per-block work within O((count + slack) log count).
ALPHABET_SLACK = 1 << 16
#: Header bytes allowed per tensor of the model on top of a fixed allowance (names, shapes, quantizer fields,
#: aliases; a typical entry takes 40-200 bytes).
_HEADER_PER_TENSOR = 4096
_HEADER_FIXED = 1 << 20
#: Payload allowance on top of twice the model's tensor bytes (a coded stream may exceed its float32 bytes only by
#: a coder's framing; a codebook holds at most one row per index).
_PAYLOAD_PER_TENSOR = 1024
_PAYLOAD_FIXED = 1 << 20


def max_index_alphabet(count: int) -> int:
    """The largest alphabet (codebook size K) a stream of ``count`` indices may declare."""
    return count + ALPHABET_SLACK


def max_codebook_alphabet(symbols: int) -> int:
    """The largest symbol alphabet of a ``lattice-int-coded`` codebook of ``symbols`` symbols (the writer's rule)."""
    return max(ALPHABET_SLACK, symbols)


def header_allowance(tensors: int) -> int:
    """Header bytes a file of a model with ``tensors`` tensors may take (capped at the format's maximum)."""
    return min(MAX_HEADER_LENGTH, _HEADER_FIXED + _HEADER_PER_TENSOR * tensors)


def payload_allowance(tensor_bytes: int, tensors: int) -> int:
    """Payload bytes a file of a model whose tensors take ``tensor_bytes`` bytes in memory may hold."""
    return 2 * tensor_bytes + _PAYLOAD_FIXED + _PAYLOAD_PER_TENSOR * tensors

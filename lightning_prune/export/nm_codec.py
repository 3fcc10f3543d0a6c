"""The N:M codec of ``compressed-nm``: kept values plus bit-packed in-group positions.

Pure tensor functions (no I/O). A weight is seen as rows ``[R, C]`` (one row per output
feature, groups of ``m`` consecutive inputs); every group stores exactly ``n`` entries: its
nonzeros, padded with zeros at the lowest unused positions, in ascending position order.
Positions are ``ceil(log2 m)``-bit codes packed least-significant bit first into a byte stream
(see docs/compressed-nm.md).
"""

from __future__ import annotations

import torch
from torch import Tensor


class NMPatternError(ValueError):
    """A group holds more than ``n`` nonzeros, or stored positions are not a valid group."""


def position_bits(m: int) -> int:
    """Bits per stored position: ``ceil(log2(m))``, at least 1."""
    return max(1, (m - 1).bit_length())


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (each < 2**bits) into a uint8 stream, least-significant bit first.

    Code ``k`` occupies stream bits ``k*bits .. k*bits+bits-1``; stream bit ``j`` is bit
    ``j % 8`` of byte ``j // 8``; the last byte is padded with zero bits.
    """
    flat = codes.reshape(-1).to(torch.int32)
    stream = (flat[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1
    stream = stream.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    byte_weights = 1 << torch.arange(8, dtype=torch.int32)
    return (stream.view(-1, 8) * byte_weights).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``count`` codes (int64) from a uint8 stream."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise NMPatternError(
            f"positions must be a 1-D uint8 stream, got {packed.dtype} "
            f"with shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_size(count, bits):
        raise NMPatternError(
            f"positions hold {packed.numel()} bytes, expected {packed_size(count, bits)} "
            f"for {count} codes of {bits} bits"
        )
    stream = (packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1
    stream = stream.reshape(-1)[: count * bits].view(count, bits)
    return (stream << torch.arange(bits)).sum(1)


def encode_nm(rows: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Encode ``rows`` ``[R, C]`` (``C % m == 0``): values ``[R, C/m*n]`` and packed positions.

    Raises :class:`NMPatternError` naming the first row and group with more than ``n`` nonzeros.
    """
    r, c = rows.shape
    if c % m:
        raise NMPatternError(f"{c} inputs are not divisible by m={m}")
    groups = rows.reshape(r, c // m, m)
    nonzero = groups != 0
    counts = nonzero.sum(-1)
    if bool((counts > n).any()):
        row, group = (counts > n).nonzero()[0].tolist()
        raise NMPatternError(
            f"row {row}, group {group} (inputs {group * m}..{group * m + m - 1}) has "
            f"{int(counts[row, group])} nonzeros, more than n={n}"
        )
    # nonzeros first, then zeros, each by ascending position; keep n and sort by position
    key = (~nonzero).to(torch.int64) * m + torch.arange(m)
    positions = key.argsort(-1)[..., :n].sort(-1).values
    values = groups.gather(-1, positions).reshape(r, -1)
    return values.contiguous(), pack_codes(positions, position_bits(m))


def decode_nm(values: Tensor, packed: Tensor, n: int, m: int, shape: tuple[int, int]) -> Tensor:
    """Restore the dense rows ``[R, C]`` from :func:`encode_nm`'s output.

    Raises :class:`NMPatternError` if the sizes disagree with ``shape`` or a group's positions
    are out of range or not strictly ascending.
    """
    r, c = shape
    if c % m or tuple(values.shape) != (r, c // m * n):
        raise NMPatternError(
            f"values have shape {tuple(values.shape)}, expected {(r, c // m * n)} "
            f"for {n}:{m} rows of shape {(r, c)}"
        )
    codes = unpack_codes(packed, position_bits(m), values.numel()).view(r, c // m, n)
    if bool((codes >= m).any()) or bool((codes[..., 1:] <= codes[..., :-1]).any()):
        raise NMPatternError(f"positions are not strictly ascending values below m={m}")
    dense = values.new_zeros(r, c // m, m)
    dense.scatter_(-1, codes, values.view(r, c // m, n))
    return dense.view(r, c)

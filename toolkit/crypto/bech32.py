"""Bech32 (BIP 173) as age uses it: no length limit, one case throughout."""
from __future__ import annotations

from typing import List, Tuple

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


class Bech32Error(ValueError):
    pass


def _polymod(values: List[int]) -> int:
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            if (top >> i) & 1:
                check ^= GENERATOR[i]
    return check


def _hrp_expand(hrp: str) -> List[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: bytes, from_bits: int, to_bits: int, pad: bool) -> List[int]:
    acc, bits, out = 0, 0, []
    maxv = (1 << to_bits) - 1
    for value in data:
        if value >> from_bits:
            raise Bech32Error("invalid data value")
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to_bits - bits)) & maxv)
    elif bits >= from_bits or ((acc << (to_bits - bits)) & maxv):
        raise Bech32Error("invalid padding")
    return out


def encode(hrp: str, data: bytes) -> str:
    words = _convert_bits(data, 8, 5, True)
    lowered = hrp.lower()
    checksum = _polymod(_hrp_expand(lowered) + words + [0] * 6) ^ 1
    words += [(checksum >> 5 * (5 - i)) & 31 for i in range(6)]
    text = lowered + "1" + "".join(CHARSET[w] for w in words)
    return text.upper() if hrp.isupper() else text


def decode(text: str) -> Tuple[str, bytes]:
    """(hrp in lower case, data). Mixed case, bad characters or checksum raise Bech32Error."""
    if text.lower() != text and text.upper() != text:
        raise Bech32Error("mixed case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise Bech32Error("separator misplaced")
    hrp, rest = text[:pos], text[pos + 1:]
    if any(ord(c) < 33 or ord(c) > 126 for c in hrp):
        raise Bech32Error("invalid human-readable part")
    try:
        words = [CHARSET.index(c) for c in rest]
    except ValueError:
        raise Bech32Error("invalid character") from None
    if _polymod(_hrp_expand(hrp) + words) != 1:
        raise Bech32Error("invalid checksum")
    return hrp, bytes(_convert_bits(bytes(words[:-6]), 5, 8, False))

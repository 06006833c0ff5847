"""Read R lazy-load data bases (`data/Rdata.rdx` + `Rdata.rdb`) without R.

An R package's data folder stores each object as a block in `Rdata.rdb`: 4 bytes (big-endian
uncompressed length), then either a zlib stream or a type byte ('Z' xz, '2' bzip2, '1' zlib,
'0' none) and the payload. `Rdata.rdx` is a gzip-compressed serialized list whose `variables`
element maps each object name to its (offset, length) in the .rdb. Objects use R's XDR
serialization format (version 2 or 3). We decode what data packages hold: character, integer,
logical, double vectors and lists, with attributes (names) kept as a dict.
Used for the Austen novels of r-cran-janeaustenr (public-domain text, MIT-licensed package).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from kdtool.errors import BadInput

_NIL = 254
_PAIRLISTS = {2, 6, 17}  # LISTSXP, LANGSXP, ATTRLISTSXP
_SPECIAL_NULLS = {242, 246, 247, 248, 249, 250, 251, 252, 253, 254}  # empty env, base env, missing arg, ...


class RVector(list):
    """An R vector: a Python list plus its R attributes (e.g. {'names': [...]})."""

    attributes: dict[str, Any]

    def __init__(self, values, attributes=None):
        super().__init__(values)
        self.attributes = attributes or {}

    def named(self) -> dict[str, Any]:
        names = self.attributes.get("names")
        if names is None:
            raise BadInput("R object has no names")
        return dict(zip(names, self, strict=True))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def header(self) -> None:
        if self.data[:2] != b"X\n":
            raise BadInput("not an XDR-serialized R object (expected 'X\\n')")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            n = self.int()  # length of the native encoding name, which we skip
            self.pos += n

    def pairlist(self, flags: int) -> dict[str, Any] | list:
        items: list[tuple[Any, Any]] = []
        while True:
            if flags & (1 << 9):
                self.item()  # attributes of a pairlist cell: not needed
            tag = self.item() if flags & (1 << 10) else None
            items.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF not in _PAIRLISTS:
                if flags & 0xFF != _NIL:
                    items.append((None, self._item(flags)))
                break
        if all(isinstance(t, str) for t, _ in items):
            return {t: v for t, v in items}
        return [v for _, v in items]

    def item(self) -> Any:
        return self._item(self.int())

    def _item(self, flags: int) -> Any:
        kind = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        if kind in _SPECIAL_NULLS:
            return None
        if kind == 255:  # REFSXP: a symbol seen before
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP: its name follows as a CHARSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.data[self.pos : self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if kind in _PAIRLISTS:
            return self.pairlist(flags)
        n = self.int()
        if kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            values = [self.item() for _ in range(n)]
        elif kind in (10, 13):  # LGLSXP, INTSXP
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise BadInput(f"unsupported R object type {kind}")
        attributes = self.item() if has_attr else None
        return RVector(values, attributes if isinstance(attributes, dict) else None)


def unserialize(data: bytes) -> Any:
    """Decode one R object serialized in XDR format."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _block(rdb: bytes, offset: int, length: int) -> bytes:
    raw = rdb[offset : offset + length]
    kind, payload = raw[4:5], raw[5:]
    if kind == b"Z":
        return lzma.decompress(payload)
    if kind == b"2":
        return bz2.decompress(payload)
    if kind == b"1":
        return zlib.decompress(payload)
    if kind == b"0":
        return payload
    return zlib.decompress(raw[4:])


def read_lazyload(stem: str | os.PathLike) -> dict[str, Any]:
    """All objects of an R lazy-load DB given its path without suffix (…/data/Rdata)."""
    stem = Path(stem)
    rdx, rdb = stem.with_suffix(".rdx"), stem.with_suffix(".rdb")
    try:
        index = unserialize(gzip.decompress(rdx.read_bytes()))
        variables = index["variables"] if isinstance(index, dict) else index.named()["variables"]
        data = rdb.read_bytes()
        return {name: unserialize(_block(data, int(off), int(n))) for name, (off, n) in variables.named().items()}
    except BadInput as exc:
        raise BadInput(f"{rdx}: {exc}") from None
    except (OSError, EOFError, struct.error, zlib.error, lzma.LZMAError, KeyError, ValueError) as exc:
        raise BadInput(f"{rdx}: not a readable R lazy-load data base ({exc})") from exc

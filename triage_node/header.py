"""The header fields the database needs, read straight from the received bytes.

On the ingest hot path :func:`triage_node.ingest.read_header` (pydicom's ``dcmread`` of the
file's first bytes, then converting each value) costs about as much CPU as everything else
the SCP does per slice. This module reads only what :func:`triage_node.ingest.instance_record`
and the SCP look at, from the same bytes, for the encodings nearly every scanner sends:
little endian, explicit or implicit VR, a character set that is absent, ``ISO_IR 6``,
``ISO_IR 100`` or ``ISO_IR 192``.

It is a fast path, not a second parser of record: whatever it does not fully understand
(another encoding or character set, a structure it cannot walk to the pixel data within the
bytes it was given, a value of an unexpected length) makes :func:`parse` return None, and
the caller falls back to pydicom, which then decides, with its own errors. A test compares
both on every DICOM file at hand (real scanners' files, pydicom's test files, our phantoms).
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.uid import UID

__all__ = ["HeaderFields", "parse"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                        b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                        b"US"))

#: (group << 16 | element) -> (keyword, VR) of every element read; the VR is what the
#: element must have (implicit VR takes it from here; explicit VR must match it).
_WANTED: dict[int, tuple[str, bytes]] = {
    0x00080005: ("SpecificCharacterSet", b"CS"),
    0x00080008: ("ImageType", b"CS"),
    0x00080016: ("SOPClassUID", b"UI"),
    0x00080018: ("SOPInstanceUID", b"UI"),
    0x00080020: ("StudyDate", b"DA"),
    0x00080050: ("AccessionNumber", b"SH"),
    0x00080060: ("Modality", b"CS"),
    0x00081030: ("StudyDescription", b"LO"),
    0x0008103E: ("SeriesDescription", b"LO"),
    0x00100010: ("PatientName", b"PN"),
    0x00100020: ("PatientID", b"LO"),
    0x00180015: ("BodyPartExamined", b"CS"),
    0x0020000D: ("StudyInstanceUID", b"UI"),
    0x0020000E: ("SeriesInstanceUID", b"UI"),
    0x00200011: ("SeriesNumber", b"IS"),
    0x00200013: ("InstanceNumber", b"IS"),
    0x00200032: ("ImagePositionPatient", b"DS"),
    0x00200037: ("ImageOrientationPatient", b"DS"),
    0x00280002: ("SamplesPerPixel", b"US"),
    0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"),
    0x00280011: ("Columns", b"US"),
    0x00280100: ("BitsAllocated", b"US"),
}
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: character sets decoded here (anything else goes to pydicom)
_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
             "ISO_IR 192": "utf-8"}
_TEXT_VRS = frozenset((b"PN", b"LO", b"SH"))  # decoded with the character set
_MAX_DEPTH = 16

_TAG = struct.Struct("<HH")
_EXPLICIT = struct.Struct("<HH2sH")
_U32 = struct.Struct("<L")
_U16 = struct.Struct("<H")


class _Unsure(Exception):
    """Something this fast path does not handle: let pydicom decide."""


class HeaderFields:
    """The elements :func:`parse` read, with the ``get`` of a pydicom Dataset.

    Values are what :func:`triage_node.ingest.instance_record` needs: text without padding
    (a list where the element has several values), ``int`` for US, UIDs as
    :class:`pydicom.uid.UID`; IS and DS values stay text (``int()``/``float()`` take them).
    """

    __slots__ = ("_values", "file_meta")

    def __init__(self, values: dict[str, Any], transfer_syntax: str) -> None:
        self._values = values
        self.file_meta = {"TransferSyntaxUID": UID(transfer_syntax)}

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __repr__(self) -> str:
        return f"HeaderFields({sorted(self._values)})"


def parse(head: bytes | bytearray | memoryview, transfer_syntax: str) -> HeaderFields | None:
    """The wanted header fields of a Part 10 file from its first bytes, or None if unsure.

    Parameters
    ----------
    head : bytes
        The file's first bytes: 128-byte preamble, ``DICM``, File Meta, dataset; they must
        reach the Pixel Data element.
    transfer_syntax : str
        The transfer syntax the dataset is encoded in (the presentation context's); must be
        the File Meta's too.

    Returns
    -------
    HeaderFields or None
        None whenever pydicom should read the file instead (see the module's docstring).
    """
    if transfer_syntax in (_BIG_ENDIAN, _DEFLATED):
        return None
    try:
        buf = bytes(head)
        start = _skip_meta(buf, transfer_syntax)
        raw = _walk(buf, start, transfer_syntax != _IMPLICIT_LE)
        return HeaderFields(_decode(raw), transfer_syntax)
    except (_Unsure, struct.error, UnicodeDecodeError, ValueError, IndexError):
        return None


def _skip_meta(buf: bytes, transfer_syntax: str) -> int:
    """Offset of the dataset after the File Meta (whose transfer syntax must match)."""
    if len(buf) < 144 or buf[128:132] != b"DICM":
        raise _Unsure("no DICM prefix")
    group, elem, vr, length = _EXPLICIT.unpack_from(buf, 132)
    if (group, elem, vr, length) != (2, 0, b"UL", 4):
        raise _Unsure("no File Meta group length")
    end: int = 144 + _U32.unpack_from(buf, 140)[0]
    pos, syntax = 144, None
    while pos < end:
        group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
        if group != 2:
            raise _Unsure("File Meta group length does not match its elements")
        if vr in _LONG_VRS:
            length = _U32.unpack_from(buf, pos + 8)[0]
            pos += 12
        elif vr in _SHORT_VRS:
            pos += 8
        else:
            raise _Unsure(f"unknown VR {vr!r} in the File Meta")
        if elem == 0x0010:
            syntax = buf[pos:pos + length].rstrip(b"\x00 ").decode("ascii")
        pos += length
    if pos != end or syntax != transfer_syntax:
        raise _Unsure("File Meta does not end where it says, or names another syntax")
    return end


def _walk(buf: bytes, pos: int, explicit: bool) -> dict[int, tuple[bytes, bytes]]:
    """Walk the top-level elements up to Pixel Data; collect the wanted raw values."""
    raw: dict[int, tuple[bytes, bytes]] = {}
    previous = -1
    first = True
    while True:
        if pos + 8 > len(buf):
            raise _Unsure("the bytes end before the pixel data")
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag <= previous or group == 2:
            raise _Unsure("elements out of order")  # pydicom reads those; so do we, slowly
        previous = tag
        if first:
            # pydicom's own test for the VR encoding (and the node's: see ingest._check_encoding)
            if (buf[pos + 4:pos + 6] in _LONG_VRS | _SHORT_VRS) != explicit:
                raise _Unsure("VR encoding differs from the transfer syntax")
            first = False
        vr, length, pos = _element_header(buf, pos, explicit, tag)
        if tag == _PIXEL_DATA:
            return raw
        if length == _UNDEFINED:
            if tag in _WANTED or vr not in (b"SQ", b"UN", b""):
                raise _Unsure("undefined length on an element that is not a sequence")
            # a UN sequence of undefined length is encoded in implicit VR (PS3.5 6.2.2)
            pos = _skip_undefined(buf, pos, explicit and vr == b"SQ", 0)
            continue
        if pos + length > len(buf):
            raise _Unsure("an element runs past the bytes at hand")
        wanted = _WANTED.get(tag)
        if wanted is not None:
            if explicit and vr != wanted[1]:
                raise _Unsure(f"{wanted[0]} has VR {vr!r}")
            raw[tag] = (wanted[1], buf[pos:pos + length])
        pos += length


def _element_header(buf: bytes, pos: int, explicit: bool, tag: int) -> tuple[bytes, int, int]:
    """(VR or b"", value length, offset of the value) of the element at ``pos``."""
    if not explicit:
        return _WANTED.get(tag, (None, b""))[1], _U32.unpack_from(buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4:pos + 6]
    if vr in _LONG_VRS:
        return vr, _U32.unpack_from(buf, pos + 8)[0], pos + 12
    if vr in _SHORT_VRS:
        return vr, _U16.unpack_from(buf, pos + 6)[0], pos + 8
    raise _Unsure(f"unknown VR {vr!r}")


def _skip_undefined(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Offset after the Sequence Delimitation Item of an undefined-length sequence."""
    if depth > _MAX_DEPTH:
        raise _Unsure("sequences nested too deep")
    while True:
        if pos + 8 > len(buf):
            raise _Unsure("a sequence runs past the bytes at hand")
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        length = _U32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsure("a sequence holds something other than items")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_item(buf, pos, explicit, depth + 1)


def _skip_item(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Offset after the Item Delimitation Item of an undefined-length item."""
    while True:
        if pos + 8 > len(buf):
            raise _Unsure("an item runs past the bytes at hand")
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        if group == 0xFFFE:
            raise _Unsure("a delimiter out of place")
        if explicit:
            vr, length, pos = _element_header(buf, pos, True, tag)
        else:
            vr, length, pos = b"", _U32.unpack_from(buf, pos + 4)[0], pos + 8
        if length == _UNDEFINED:
            if vr not in (b"SQ", b"UN", b""):
                raise _Unsure("undefined length on an element that is not a sequence")
            pos = _skip_undefined(buf, pos, explicit and vr == b"SQ", depth)
        else:
            pos += length


def _decode(raw: dict[int, tuple[bytes, bytes]]) -> dict[str, Any]:
    charset = raw.get(0x00080005)
    name = charset[1].decode("ascii").strip(" \x00") if charset else ""
    encoding = _CHARSETS.get(name)
    if encoding is None:
        raise _Unsure(f"character set {name!r}")
    values: dict[str, Any] = {}
    for tag, (vr, value) in raw.items():
        keyword = _WANTED[tag][0]
        if vr == b"US":
            if len(value) != 2:
                raise _Unsure(f"{keyword} is not one US value")
            values[keyword] = _U16.unpack(value)[0]
            continue
        text = value.decode(encoding if vr in _TEXT_VRS else "ascii")
        if vr == b"UI":
            values[keyword] = UID(text.rstrip("\x00 ").strip())
            continue
        if vr == b"PN":
            values[keyword] = text.rstrip("\x00 ")
            continue
        # as pydicom: padding goes at the end of the whole value, not of each value
        parts = text.rstrip(" \x00").split("\\")
        values[keyword] = parts if len(parts) > 1 else parts[0]
    return values

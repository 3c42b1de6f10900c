"""Many copies of one content item shape, cheaply: encode it once with pydicom, copy the encoded elements.

A findings SR of a 300-slice study holds thousands of IMAGE content items (one per key image of each answer, twice
per answer), a KOS hundreds. Building each with highdicom (~150 µs), deep-copying and re-parsing the tree inside the
SR constructor, and writing each element through pydicom's writer took seconds. Here an item is built by highdicom
once per distinct value, written to bytes by pydicom once, and read back as *raw* data elements; every further use is
a new :class:`~pydicom.dataset.Dataset` over the same (immutable) raw elements. pydicom writes a raw element's bytes
as they are, so the file is byte for byte what writing the highdicom item would give, and reading an attribute of
such an item decodes it on access as for any dataset read from a file.

Two more helpers keep pydicom from undoing that at write time: :func:`raw_sequence` (a whole Content Sequence as one
encoded element) and :func:`declare_explicit_little_endian` (skip pydicom's ambiguous-VR walk, which decodes every raw
element below a dataset built in memory).

The raw bytes are Explicit VR Little Endian: only datasets written in that transfer syntax may hold these items
(:func:`check_explicit_little_endian`). tests/reports/test_encoded.py checks every object against pydicom's ordinary
encoding of its decoded content and the items against highdicom's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Iterable
from io import BytesIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr_element, write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
CONTENT_SEQUENCE = 0x0040A730  # (0040,A730), set as a plain or raw element where highdicom's property refuses it


def encode_explicit_le(dataset: Dataset, parent_encoding: str | list[str] = default_encoding) -> bytes:
    """The elements of ``dataset`` as pydicom writes them in Explicit VR Little Endian (no item header), text in
    ``parent_encoding`` (a Specific Character Set value or Python codec names) unless the dataset has its own."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset, parent_encoding=convert_encodings(parent_encoding))
    return buffer.getvalue()


def encode_item(dataset: Dataset, parent_encoding: str | list[str] = default_encoding) -> bytes:
    """``dataset`` as one sequence item, as pydicom writes it: Item tag, defined length, elements."""
    body = encode_explicit_le(dataset, parent_encoding)
    return _ITEM_TAG + struct.pack("<I", len(body)) + body


class SharedLeafEncoder:
    """Encodes many items of one shape that differ in a few values (a SEG's per-plane items: the same codes and
    flags, a different image UID and position): each distinct leaf element — same tag, VR and value — is written by
    pydicom once and its bytes reused; sequences and items around them are framed as pydicom frames them (defined
    lengths). An item with an element of ambiguous VR is written by pydicom whole."""

    def __init__(self, parent_encoding: str | list[str] = default_encoding) -> None:
        self._parent_encoding = parent_encoding
        self._leaves: dict[tuple, bytes] = {}

    def item(self, dataset: Dataset) -> bytes:
        """``dataset`` as one sequence item, the bytes :func:`encode_item` gives."""
        if any(" or " in str(element.VR) for element in dataset._dict.values()) or "SpecificCharacterSet" in dataset:
            return encode_item(dataset, self._parent_encoding)
        body = b"".join(self._element(dataset[tag]) for tag in sorted(dataset._dict))
        return _ITEM_TAG + struct.pack("<I", len(body)) + body

    def _element(self, element) -> bytes:
        if element.VR == "SQ":
            items = b"".join(self.item(item) for item in element.value)
            return struct.pack("<HH", element.tag.group, element.tag.elem) + b"SQ\x00\x00" + struct.pack(
                "<I", len(items)) + items
        key = (element.tag, element.VR, _frozen(element.value))
        encoded = self._leaves.get(key)
        if encoded is None:
            single = Dataset()
            single.add(element)
            encoded = self._leaves[key] = encode_explicit_le(single, self._parent_encoding)
        return encoded


def _frozen(value) -> Hashable:
    """A leaf value as a key: its type and its text (pydicom writes numbers as text for DS/IS, from ``str``)."""
    if isinstance(value, (list, tuple, MultiValue)):
        return tuple(_frozen(v) for v in value)
    return (type(value).__name__, value if isinstance(value, (bytes, int, float)) else str(value))


def raw_sequence(tag: int, encoded_items: Iterable[bytes]) -> RawDataElement:
    """A sequence element (defined length, as pydicom writes one) whose items are already encoded."""
    value = b"".join(encoded_items)
    return RawDataElement(BaseTag(tag), "SQ", len(value), value, 0, False, True)


def raw_template(dataset: Dataset) -> Dataset:
    """``dataset`` encoded and read back: a dataset of raw (undecoded) Explicit VR Little Endian elements."""
    return read_dataset(BytesIO(encode_explicit_le(dataset)), is_implicit_VR=False, is_little_endian=True)


class EncodedItems:
    """Items made by ``build(key)``, built and encoded once per distinct ``key``; :meth:`item` returns a new dataset
    sharing the encoded elements (a later assignment to it replaces an element of that dataset only)."""

    def __init__(self, build: Callable[[Hashable], Dataset]) -> None:
        self._build = build
        self._templates: dict[Hashable, Dataset] = {}
        self._encoded: dict[Hashable, bytes] = {}

    def encoded(self, key: Hashable) -> bytes:
        """The item for ``key`` as encoded sequence item bytes (see :func:`raw_sequence`); ASCII values only."""
        data = self._encoded.get(key)
        if data is None:
            data = self._encoded[key] = encode_item(self._build(key))
        return data

    def item(self, key: Hashable) -> Dataset:
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = raw_template(self._build(key))
        item = Dataset(dict(template._dict), parent_encoding=default_encoding)
        # Declares the raw elements' encoding, so that pydicom writes them as they are instead of decoding and
        # re-encoding them (the values are ASCII: UIDs and code strings, the same bytes in any character set).
        item.set_original_encoding(False, True, default_encoding)
        return item


def check_explicit_little_endian(dataset: Dataset) -> None:
    """Refuse a dataset whose transfer syntax is not the one the encoded items were written in."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax != ExplicitVRLittleEndian:
        raise ValueError(f"encoded content items need Explicit VR Little Endian, the dataset is written in {syntax}")


def _resolve_ambiguous_vrs(dataset: Dataset, ancestors: list[Dataset]) -> bool:
    """Give every element of ambiguous VR (US or SS, OB or OW...) its Explicit VR Little Endian VR, as pydicom's writer
    would; False when one stays ambiguous."""
    for element in list(dataset._dict.values()):
        if " or " in str(element.VR) and not getattr(element, "is_raw", False):
            correct_ambiguous_vr_element(element, dataset, True, [dataset, *ancestors])
            if " or " in str(element.VR):
                return False
    return True


def declare_explicit_little_endian(dataset: Dataset) -> None:
    """Let pydicom write the encoded items of ``dataset``'s content tree as they are, and skip its VR correction walk.

    pydicom re-encodes a dataset created in memory through its ambiguous-VR correction, which walks the whole tree and
    decodes every raw sequence below it (thousands of items: most of the write time). Here each decoded dataset of the
    tree gets its ambiguous VRs resolved the way that walk would (``correct_ambiguous_vr_element``, pydicom's own rule:
    e.g. Pixel Data OB for 1-bit SEG frames) and is then declared as already in the written encoding (Explicit VR
    Little Endian, its own character set). A dataset whose VR cannot be resolved is left undeclared, so pydicom still
    corrects it. Raw items are skipped (:meth:`EncodedItems.item` declares them). Declare after the last change of
    the tree and of (0008,0005) Specific Character Set; a later change is still written correctly only if it adds no
    element of ambiguous VR.
    """
    check_explicit_little_endian(dataset)
    stack: list[tuple[Dataset, list[Dataset]]] = [(dataset, [])]
    while stack:
        current, ancestors = stack.pop()
        if _resolve_ambiguous_vrs(current, ancestors):
            current.set_original_encoding(False, True, current._character_set)
        for element in current._dict.values():
            if element.VR == "SQ" and not getattr(element, "is_raw", False):
                stack.extend((item, [current, *ancestors]) for item in element.value)

"""Storage formats for weight matrices; importing this package registers every format.

Example::

    from sparsec.formats import pack, format_class
    p = pack(w, "bitmask", "int8")
    again = format_class("bitmask").from_tensors("layer", p.tensors("layer"), **p.options())
    assert torch.equal(again.unpack(), p.unpack())
"""

from sparsec.formats import bitmask, block, csr, dense, nm  # noqa: F401  (registration)
from sparsec.formats.base import (
    STORAGE_DTYPE,
    VALUE_TYPES,
    FormatError,
    PackedWeight,
    format_class,
    pack,
    register_format,
    registered_formats,
)
from sparsec.formats.bitmask import BitmaskArrays, BitmaskWeight
from sparsec.formats.block import BlockWeight
from sparsec.formats.csr import CsrWeight
from sparsec.formats.dense import DenseWeight
from sparsec.formats.nm import NmWeight

__all__ = [
    "STORAGE_DTYPE",
    "VALUE_TYPES",
    "BitmaskArrays",
    "BitmaskWeight",
    "BlockWeight",
    "CsrWeight",
    "DenseWeight",
    "FormatError",
    "NmWeight",
    "PackedWeight",
    "format_class",
    "pack",
    "register_format",
    "registered_formats",
]

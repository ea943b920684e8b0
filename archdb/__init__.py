"""The archive: base models, architectures, protocols, evaluations, predictors and queries.

Public entry points: ``Archive`` (open a database, sessions, migrations), the domain types in
``arch`` and ``protocol``, ``ingest_file`` and the read helpers in ``reads``.
"""

from .arch import (Architecture, ArchitectureError, BaseSpec, LayerSpec, config_hash, from_ratios,
                   parse_architecture, uniform, uniform_at_size)
from .archive import Archive, ArchiveError, resolve_url
from .formats import FormatError
from .ingest import ingest_file
from .protocol import Measurement, Protocol, ProtocolError
from .reads import NotFound
from .sizes import SizeError, format_size, parse_size, parse_tolerance
from .store import StoreError, WriteReport

__all__ = [
    "Architecture", "ArchitectureError", "Archive", "ArchiveError", "BaseSpec", "FormatError", "LayerSpec",
    "Measurement", "NotFound", "Protocol", "ProtocolError", "SizeError", "StoreError", "WriteReport",
    "config_hash", "format_size", "from_ratios", "ingest_file", "parse_architecture", "parse_size",
    "parse_tolerance", "resolve_url", "uniform", "uniform_at_size",
]

"""The archive: base models, architectures, protocols, evaluations, predictors and queries.

Public entry points: ``Archive`` (open a database, sessions, migrations), the domain types in
``arch`` and ``protocol``, ``ingest_file`` and the read helpers in ``reads``. They are imported on
first use (PEP 562), so ``import archopt.archdb.errors`` or ``archopt --help`` loads no SQLAlchemy.
"""

from __future__ import annotations

from archopt.lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "Architecture": "arch", "ArchitectureError": "arch", "BaseSpec": "arch", "LayerSpec": "arch",
    "config_hash": "arch", "from_ratios": "arch", "parse_architecture": "arch", "uniform": "arch",
    "uniform_at_size": "arch",
    "Archive": "archive", "ArchiveError": "archive", "resolve_url": "archive",
    "FormatError": "formats",
    "ingest_file": "ingest",
    "Measurement": "protocol", "Protocol": "protocol", "ProtocolError": "protocol",
    "NotFound": "reads",
    "SizeError": "sizes", "format_size": "sizes", "parse_size": "sizes", "parse_tolerance": "sizes",
    "StoreError": "store", "WriteReport": "store",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

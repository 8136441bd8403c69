"""Record schemas, validation, loading and same-prompt pair building."""

from zr_diffusion.data.records import (
    DataError,
    PreferencePair,
    ScoredRecord,
    build_pairs,
    load_image,
    load_records,
    save_image,
    write_records,
)

__all__ = [
    "DataError",
    "PreferencePair",
    "ScoredRecord",
    "build_pairs",
    "load_image",
    "load_records",
    "save_image",
    "write_records",
]

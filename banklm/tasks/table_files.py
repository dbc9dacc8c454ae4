"""Reading a bank's table files (CSV/TSV, Parquet) into rows of column -> cell."""

from __future__ import annotations

import csv
from pathlib import Path


def read_table(path: Path) -> list[dict]:
    """The rows of a CSV/TSV (UTF-8, UTF-8 BOM or GB18030) or Parquet table as dicts (column -> cell)."""
    suffix = path.suffix.lower()
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency of datasets
        pd = None
    if suffix in (".parquet", ".pq"):
        if pd is not None:
            return pd.read_parquet(path).to_dict(orient="records")
        from datasets import Dataset  # pragma: no cover

        return list(Dataset.from_parquet(str(path)))  # pragma: no cover
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .csv, .tsv or .parquet)")
    raw = path.read_bytes()
    for enc in ("utf-8-sig", "gb18030"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ValueError(f"{path}: cannot decode as UTF-8 or GB18030")
    delim = "\t" if suffix == ".tsv" else ","
    return [dict(r) for r in csv.DictReader(text.splitlines(), delimiter=delim)]


def row_label(path: Path, i: int) -> str:
    """How errors name row ``i`` (0-based) of a table: its line in a CSV/TSV (the header is line 1), its index in
    a Parquet file."""
    return f"row {i + 2 if path.suffix.lower() != '.parquet' else i}"

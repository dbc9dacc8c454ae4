"""Reading a bank's table files (CSV/TSV, JSONL, Parquet, Excel .xlsx) into rows of column -> cell.

Tables come from bank systems as exports: CSV in UTF-8 or GBK/GB18030 (with or without a byte-order mark),
Excel workbooks, JSON lines, Parquet. Whatever the format, :func:`read_table` returns the same thing: a
:class:`Table` (a list of dicts, every row holding every column) whose cells are ``str``, ``int``, ``float``,
``bool``, a date/datetime, or ``None`` for an empty cell, which :func:`banklm.tasks.spec.coerce_value` reads.
A file that cannot be read is one ``ValueError`` line naming the file and why; so is a header that does not
name every column once (empty or duplicate names, merged header cells).
"""

from __future__ import annotations

import codecs
import csv
import datetime as _dt
import io
import json
import math
import re
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
EXCEL_SUFFIXES = (".xlsx", ".xlsm")
SUFFIXES = CSV_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + EXCEL_SUFFIXES
_MERGE_RE = re.compile(rb'<(?:\w+:)?mergeCell\b[^>]*\bref="([A-Z]+[0-9]+(?::[A-Z]+[0-9]+)?)"')
_CELL_RE = re.compile(r"([A-Z]+)([0-9]+)")


class Table(list):
    """The rows of a table (dicts: column -> cell), with ``columns`` (the header, in order), ``lines`` (where
    each row is in the file: a CSV line, a sheet row, a JSONL line, a Parquet row index) and ``where`` (the
    file, and the sheet of a workbook)."""

    def __init__(self, rows=(), *, columns=(), lines=(), where: str = ""):
        super().__init__(rows)
        self.columns: list[str] = list(columns)
        self.lines: list[int] = list(lines)
        self.where = where


def read_table(path: str | Path, sheet: str | None = None) -> Table:
    """The rows of a CSV/TSV (UTF-8, UTF-8 BOM, UTF-16 BOM, GBK/GB18030), JSONL, Parquet or Excel (.xlsx) table.

    ``sheet``: the worksheet of a workbook (default: the first); other formats have none. Fully empty rows are
    left out; empty cells are None."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        hint = " (an old Excel .xls file: save it as .xlsx)" if suffix == ".xls" else ""
        raise ValueError(f"{path}: unsupported table format {suffix or '(no suffix)'!r}{hint}; use "
                         ".csv, .tsv, .jsonl, .parquet or .xlsx")
    if sheet is not None and suffix not in EXCEL_SUFFIXES:
        raise ValueError(f"{path}: sheet {sheet!r} given, but a {suffix} file has no sheets (only .xlsx has)")
    if not path.is_file():
        raise ValueError(f"{path}: table not found" if not path.exists() else f"{path}: is not a file")
    try:
        if suffix in EXCEL_SUFFIXES:
            return _read_excel(path, sheet)
        if suffix in PARQUET_SUFFIXES:
            return _read_parquet(path)
        text = _decode(path, path.read_bytes())
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text)
    return _read_csv(path, text, "\t" if suffix == ".tsv" else None)


def row_label(path: str | Path, i: int, rows: Table | None = None) -> str:
    """How errors name row ``i`` (0-based) of a table: ``row N`` with N its line in a CSV/TSV (the header is
    line 1) or a JSONL file, its row in an Excel sheet, its index in a Parquet file. Give ``rows`` (what
    :func:`read_table` returned) for exact numbers past skipped empty lines or cells spanning lines."""
    lines = getattr(rows, "lines", None)
    if lines and 0 <= i < len(lines):
        return f"row {lines[i]}"
    suffix = Path(path).suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return f"row {i}"
    return f"row {i + 1 if suffix in JSONL_SUFFIXES else i + 2}"


# ------------------------------------------------------------------------------------------------ cells

def _cell(v: Any) -> Any:
    """One cell as str / int / float / bool / date / datetime / None (numpy and pandas scalars unboxed)."""
    if v is None:
        return None
    if isinstance(v, str):
        return v if v.strip() else None
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, (_dt.datetime, _dt.date)):
        to_py = getattr(v, "to_pydatetime", None)  # pandas Timestamp (NaT included)
        if to_py is not None:
            return None if v != v else to_py()
        return v
    if isinstance(v, _dt.time):
        return v.isoformat()
    if isinstance(v, bytes):
        return _cell(v.decode("utf-8", errors="replace"))
    item = getattr(v, "item", None)  # numpy scalars
    if item is not None and not isinstance(v, (list, dict)) and getattr(v, "ndim", 0) == 0:
        return _cell(item())
    if hasattr(v, "tolist"):  # numpy arrays in Parquet list columns
        return v.tolist()
    return v


def _header(path: Path, names: list[Any], where: str, cols: list[str] | None = None) -> list[str]:
    """Header names as text, stripped; an empty or repeated name is an error naming the column."""
    out: list[str] = []
    for j, n in enumerate(names):
        name = "" if n is None else str(n).strip().lstrip("\ufeff").strip()
        col = cols[j] if cols else str(j + 1)
        if not name:
            raise ValueError(f"{path}: {where}column {col} has no name in the header row: give every column a name")
        if name in out:
            first = cols[out.index(name)] if cols else str(out.index(name) + 1)
            raise ValueError(f"{path}: {where}duplicate column name {name!r} (columns {first} and {col}): "
                             "give every column its own name")
        out.append(name)
    return out


def _unnamed_empty(names: list[Any], rows: list[list[Any]]) -> set[int]:
    """Columns without a name and without a single value (trailing separators, formatted empty columns): dropped."""
    return {j for j, n in enumerate(names) if (n is None or not str(n).strip())
            and all(j >= len(r) or _cell(r[j]) is None for r in rows)}


def _table(path: Path, names: list[Any], rows: list[list[Any]], lines: list[int], where: str = "",
           letters: list[str] | None = None) -> Table:
    drop = _unnamed_empty(names, rows)
    keep = [j for j in range(len(names)) if j not in drop]
    columns = _header(path, [names[j] for j in keep], where, [letters[j] for j in keep] if letters else None)
    out = Table(columns=columns, where=f"{path}" + (f", {where.rstrip(': ')}" if where else ""))
    for raw, line in zip(rows, lines, strict=True):
        cells = [_cell(raw[j]) if j < len(raw) else None for j in keep]
        extra = [c for c in raw[len(names):] if _cell(c) is not None]
        if extra:
            raise ValueError(f"{path}: {where}row {line} has {len(names) + len(extra)} or more cells, the header "
                             f"names {len(names)} (a separator inside an unquoted cell?)")
        if all(c is None for c in cells):
            continue
        out.append(dict(zip(columns, cells, strict=True)))
        out.lines.append(line)
    return out


# ------------------------------------------------------------------------------------------------ text

def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 (with or without BOM), UTF-16 with BOM (Excel's "Unicode text"), else GB18030 (a superset of GBK)."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not valid UTF-16 text (it starts with a UTF-16 byte-order mark)") from None
    if b"\x00" in raw[:65536]:
        raise ValueError(f"{path}: a binary file, not a text table (NUL bytes)")
    for enc in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    raise ValueError(f"{path}: cannot decode as UTF-8 or GBK/GB18030 text")


def _read_csv(path: Path, text: str, delim: str | None) -> Table:
    if delim is None:  # .csv / .txt: a header with tabs and no commas is tab-separated (Excel's text export)
        first = text.split("\n", 1)[0]
        delim = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        names = next(reader, None)
        if names is None:
            raise ValueError(f"{path}: empty file (no header row)")
        rows, lines = [], []
        start = reader.line_num + 1
        for r in reader:
            rows.append(r)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: not readable as CSV ({e})") from None
    return _table(path, names, rows, lines)


def _read_jsonl(path: Path, text: str) -> Table:
    rows: list[dict] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {n}: not valid JSON ({str(e).split(':')[0]})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {n}: a JSON object (one row) per line, got {type(obj).__name__}")
        for k in obj:
            if not str(k).strip():
                raise ValueError(f"{path}: line {n}: a key with no name: give every column a name")
            columns.setdefault(str(k).strip(), None)
        rows.append({str(k).strip(): v for k, v in obj.items()})
        lines.append(n)
    if not columns:
        raise ValueError(f"{path}: no rows (one JSON object per line)")
    names = list(columns)
    return _table(path, names, [[r.get(c) for c in names] for r in rows], lines)


# ------------------------------------------------------------------------------------------------ Parquet

def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq

        data = pq.read_table(path)
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # pyarrow raises its own error types for broken files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable Parquet file ({msg})") from None
    names = list(data.column_names)
    cols = [data.column(c).to_pylist() for c in names]
    for j, values in enumerate(cols):  # an integer column with gaps is stored as floats: give the ints back
        vals = [v for v in values if isinstance(v, float) and not math.isnan(v)]
        if vals and all(v.is_integer() and abs(v) < 2**53 for v in vals) and str(data.schema.field(j).type) in (
                "double", "float"):
            nums = [isinstance(v, float) and not math.isnan(v) for v in values]
            cols[j] = [int(v) if ok else v for v, ok in zip(values, nums, strict=True)]
    rows = [list(r) for r in zip(*cols, strict=True)] if cols else []
    return _table(path, names, rows, list(range(len(rows))))


# ------------------------------------------------------------------------------------------------ Excel

def _letter(j: int) -> str:
    out = ""
    j += 1
    while j:
        j, r = divmod(j - 1, 26)
        out = chr(65 + r) + out
    return out


def _col_index(letters: str) -> int:
    n = 0
    for c in letters:
        n = n * 26 + ord(c) - 64
    return n - 1


def _merged_ranges(ws) -> list[tuple[str, int, int, int, int]]:
    """The merged ranges of a read-only worksheet ``(ref, min_row, min_col, max_row, max_col)``, 1-based rows,
    0-based columns, read from the sheet's XML (read-only sheets do not parse them)."""
    get_source = getattr(ws, "_get_source", None)
    if get_source is None:  # pragma: no cover - openpyxl internals moved: merged cells go undetected
        return []
    out = []
    tail = b""
    with get_source() as fh:
        while chunk := fh.read(1 << 20):
            buf = tail + chunk
            for m in _MERGE_RE.finditer(buf):
                ref = m.group(1).decode()
                a, _, b = ref.partition(":")
                (c1, r1), (c2, r2) = _CELL_RE.fullmatch(a).groups(), _CELL_RE.fullmatch(b or a).groups()
                out.append((ref, int(r1), _col_index(c1), int(r2), _col_index(c2)))
            tail = buf[-200:]
    return list({r[0]: r for r in out}.values())


def _excel_value(cell) -> Any:
    """A cell's value; a number formatted as a percentage (0.453 shown 45.3%) as the text Excel shows."""
    v = getattr(cell, "value", None)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and "%" in (getattr(cell, "number_format", "") or ""):
        return f"{round(v * 100, 10):g}%"
    return v


def _read_excel(path: Path, sheet: str | None) -> Table:
    try:
        import openpyxl
    except ImportError:  # pragma: no cover - a dependency of banklm
        raise ValueError(f"{path}: reading Excel files needs openpyxl (pip install openpyxl)") from None
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not an .xlsx workbook, or a damaged one"
        raise ValueError(f"{path}: cannot read the workbook ({why})") from None
    except Exception as e:  # openpyxl's own errors (InvalidFileException, a locked/encrypted file ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot read the workbook ({msg})") from None
    try:
        names = wb.sheetnames
        if not names:
            raise ValueError(f"{path}: the workbook has no sheets")
        if sheet is None:
            sheet = names[0]
        elif sheet not in names:
            raise ValueError(f"{path}: no sheet {sheet!r} (sheets: {', '.join(repr(n) for n in names)})")
        ws = wb[sheet]
        merged = _merged_ranges(ws)
        where = f"sheet {sheet!r}: "
        grid = [(r, [_excel_value(c) for c in row]) for r, row in enumerate(ws.iter_rows(), 1)]
    finally:
        wb.close()
    by_row = dict(grid)
    first = next((r for r, cells in grid if any(_cell(c) is not None for c in cells)), None)
    if first is None:
        raise ValueError(f"{path}: {where}the sheet is empty")
    in_head = [m for m in merged if m[1] <= first <= m[3]]
    if in_head:
        refs = ", ".join(m[0] for m in in_head[:5])
        raise ValueError(f"{path}: {where}merged header cells {refs} in row {first}: unmerge them and give every "
                         "column its own name (a title row above the header: delete it)")
    for _, r1, c1, r2, c2 in merged:  # a merged block of data cells reads as its value in every cell it spans
        top = by_row.get(r1, [])
        value = top[c1] if c1 < len(top) else None
        for r in range(max(r1, first + 1), r2 + 1):
            cells = by_row.get(r)
            if cells is None:
                continue
            cells.extend([None] * (c2 + 1 - len(cells)))
            for j in range(c1, c2 + 1):
                if (r, j) != (r1, c1):
                    cells[j] = value
    grid = [(r, cells) for r, cells in grid if r >= first]
    width = max(len(c) for _, c in grid)
    header = grid[0][1]
    rows = [cells for _, cells in grid[1:]]
    header = list(header) + [None] * (width - len(header))
    return _table(path, header, rows, [r for r, _ in grid[1:]], where, [_letter(j) for j in range(width)])


__all__ = ["Table", "read_table", "row_label", "SUFFIXES"]

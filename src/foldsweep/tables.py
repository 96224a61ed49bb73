"""Read CSV and Parquet files with pyarrow, refusing what foldsweep cannot use in one line.

`open_table` is the loader's entry: a Parquet file stays a `pq.ParquetFile`, so its numeric columns
can be read one row group at a time straight into the float32 matrix (no whole Arrow table beside the
matrix); a CSV file is parsed whole (multi-threaded) into an Arrow table. Neither builds a pandas
frame; `read_table` (the prediction path) hands back a DataFrame.
"""

from __future__ import annotations

import csv
import difflib
import unicodedata
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from foldsweep.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MAX_COLUMNS", "Source", "arrow_errors", "check_names", "open_table", "read_header", "read_table",
           "require_columns"]

MAX_COLUMNS = 10_000  # columns of a table, and features after one-hot encoding: an MLP input, not a text corpus
MAX_HEADER_BYTES = 4 << 20  # a header line longer than this cannot be MAX_COLUMNS names of sane length
PARQUET_SUFFIXES = (".parquet", ".pq")
Source: TypeAlias = "pa.Table | pq.ParquetFile"


def open_table(path: Path) -> Source:
    """A Parquet file opened (schema and row count only) or a CSV file read into Arrow.

    Errors met later while reading the Parquet file's columns are turned into one line by
    `arrow_errors(path)`, which the caller holds around its reads.
    """
    with arrow_errors(path):
        if _is_parquet(path):
            _check_parquet_width(path)
            source: Source = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)  # read what is decoded
            schema = source.schema_arrow
        else:
            source = _read_csv(path)
            schema = source.schema
        names = schema.names  # decoding a name that is not UTF-8 fails here
    check_names(names, str(path))
    _refuse_binary(schema, path)
    return source


def read_table(path: Path, *, exact: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame; numeric columns not in `exact` arrive as float32.

    Whatever the file holds, the answer is a DataFrame or a one-line DataError naming the file.
    """
    source = open_table(path)
    with arrow_errors(path):
        table = source.read() if isinstance(source, pq.ParquetFile) else source
        table = _float32_numeric(table, exact)
        return table.to_pandas(split_blocks=True, self_destruct=True)


def read_header(path: Path) -> list[str]:
    """A file's column names without reading its rows (the schema, or the CSV's first block)."""
    try:
        if _is_parquet(path):
            return list(pq.read_schema(path).names)
        _check_header_width(path)
        with pacsv.open_csv(path) as reader:
            return list(reader.schema.names)
    except (pa.ArrowException, UnicodeError, OSError) as err:
        raise DataError(f"data file `{path}` cannot be read: {_arrow_message(err)}") from None


@contextmanager
def arrow_errors(path: Path) -> Iterator[None]:
    """Whatever pyarrow meets in the file (bad bytes, a torn page, not UTF-8) becomes one line naming it."""
    try:
        yield
    except (pa.ArrowException, UnicodeError, OSError) as err:
        kind = "Parquet" if _is_parquet(path) else "CSV"
        raise DataError(f"data file `{path}` cannot be read as {kind}: {_arrow_message(err)}") from None


def check_names(names: list[str], source: str) -> None:
    """Duplicate names (one hashed pass) and a sane width; pandas would rename a repeated column silently.

    Two spellings of one name (NFC and NFD, say `café` typed two ways) look alike in every message and
    would be two features: refused, as are names with control characters (a NUL in a header is a binary
    file read as text), which no message could show.
    """
    if len(names) > MAX_COLUMNS:
        raise DataError(f"`{source}` has {len(names):,} columns; foldsweep reads at most {MAX_COLUMNS:,}")
    texts = [str(n) for n in names]
    dupes = sorted(name for name, count in Counter(texts).items() if count > 1)
    if dupes:
        raise DataError(f"data file `{source}` has duplicate column names: {', '.join(dupes[:12])}"
                        + (f" and {len(dupes) - 12} more" if len(dupes) > 12 else ""))
    _refuse_control_characters(texts, source)
    _refuse_look_alikes(texts, source)


def _refuse_control_characters(names: list[str], source: str) -> None:
    for position, name in enumerate(names):
        if any(unicodedata.category(char) == "Cc" for char in name):
            raise DataError(f"column {position + 1} of `{source}` has a control character in its name "
                            f"({ascii(name)[:80]}); is it a text table? Rename the column")


def _refuse_look_alikes(names: list[str], source: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            raise DataError(f"`{source}` has two columns spelt alike, {ascii(seen[key])} and {ascii(name)} (one "
                            "name in two Unicode forms); rename one, or write both in one form (NFC)")
        seen[key] = name


def require_columns(columns: list[str], names: list[str], source: str) -> None:
    """Each of `names` must be a column; a missing one is named with the closest match."""
    present = set(columns)
    for name in names:
        if name not in present:
            close = difflib.get_close_matches(name, columns[:MAX_COLUMNS], n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise DataError(f"column `{name}` not found in `{source}`{hint}; columns: {', '.join(columns[:12])}"
                            + (" ..." if len(columns) > 12 else ""))


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _check_parquet_width(path: Path) -> None:
    width = len(pq.read_schema(path).names)
    if width > MAX_COLUMNS:
        raise DataError(f"data file `{path}` has {width:,} columns; foldsweep reads at most {MAX_COLUMNS:,}")


def _read_csv(path: Path) -> pa.Table:
    _check_header_width(path)
    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except pa.ArrowInvalid as err:
        if str(err).startswith("Empty CSV file"):
            raise DataError(f"data file `{path}` is empty") from None
        raise


def _check_header_width(path: Path) -> None:
    """Count the header's fields before pyarrow infers a type for each: a 10^5-column file is refused in ms."""
    with path.open("rb") as handle:
        line = handle.readline(MAX_HEADER_BYTES + 1)
    if not line.strip():
        raise DataError(f"data file `{path}` is empty")
    if len(line) > MAX_HEADER_BYTES:
        raise DataError(f"data file `{path}` has a first line longer than {MAX_HEADER_BYTES >> 20} MiB; foldsweep "
                        f"reads CSV files with a header of at most {MAX_COLUMNS:,} columns")
    fields = next(csv.reader([line.decode("utf-8", errors="replace")]), [])
    if len(fields) > MAX_COLUMNS:
        raise DataError(f"data file `{path}` has {len(fields):,} columns; foldsweep reads at most {MAX_COLUMNS:,}")


def _arrow_message(err: BaseException) -> str:
    if isinstance(err, UnicodeError):
        return "it is not UTF-8 text"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _refuse_binary(schema: pa.Schema, path: Path) -> None:
    """pyarrow reads a column that is not UTF-8 as bytes; as labels or categories they would print as b'...'."""
    for field in schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            raise DataError(f"column `{field.name}` of data file `{path}` is not UTF-8 text; save the file as UTF-8")


def _float32_numeric(table: pa.Table, exact: set[str] | frozenset[str]) -> pa.Table:
    """Numeric columns not in `exact` cast to float32 in Arrow, so pandas never holds them as float64."""
    columns = []
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)  # null: all empty
        cast = numeric and name not in exact and kind != pa.float32()
        columns.append(pc.cast(column, pa.float32(), safe=False) if cast else column)
    return pa.Table.from_arrays(columns, names=table.column_names)

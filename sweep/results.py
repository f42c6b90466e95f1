"""Trial rows as a Parquet dataset under ``DIR/trials``, read back with pandas.

One writer (the driver) buffers rows and appends them in batches as part files, each written to a
temporary name and renamed, so a crash never leaves half a file. When the sweep ends the parts are
compacted into one file (deduplicated by ``trial_id``, the latest row kept), so
``pandas.read_parquet(DIR + "/trials")`` and :func:`load` see one row per trial.

Column types are fixed before the first row is written, from every trial of the sweep: a parameter
that is always an int is int64, always a number float64, always a bool bool; a parameter whose values
mix kinds (``target: 0`` and ``target: all``; ``clean_size: 100`` and ``one_shot``) is a string.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from defenses import DEFENSES
from sweep.spec import Trial

BASE_COLUMNS = {
    "sweep": pa.string(), "trial_id": pa.string(), "model_key": pa.string(), "dataset": pa.string(),
    "model": pa.string(), "attack": pa.string(), "defense": pa.string(), "defense_key": pa.string(), "seed": pa.int64(),
    "status": pa.string(), "error": pa.string(), "clean_acc": pa.float64(), "asr": pa.float64(),
    "robust_acc": pa.float64(), "attack_clean_acc": pa.float64(), "attack_asr": pa.float64(),
    "attack_robust_acc": pa.float64(), "attack_seconds": pa.float64(), "defense_seconds": pa.float64(),
    "attack_cached": pa.bool_(), "started_at": pa.string(), "finished_at": pa.string(), "host": pa.string(),
    "device": pa.string(), "clean_from": pa.string(), "checkpoint": pa.string(),
}


_OUTPUT_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string(), "bool": pa.bool_()}


def _kind(values: list) -> pa.DataType:
    vals = [v for v in values if v is not None]
    if vals and all(isinstance(v, bool) for v in vals):
        return pa.bool_()
    if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pa.int64()
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return pa.float64()
    return pa.string()


def _is_text(t: pa.DataType) -> bool:
    # pandas 3 writes its strings as large_string: the same text as the engine's string, not a mixed column
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _merge_type(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The type of a column seen as ``a`` in one run and ``b`` in another."""
    if _is_text(a) and _is_text(b):
        return pa.string()
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if {a, b} == {pa.int64(), pa.float64()}:
        return pa.float64()
    return pa.string()


def _unified(schemas: list[pa.Schema]) -> pa.Schema:
    types: dict[str, pa.DataType] = {}
    for s in schemas:
        for f in s:
            types[f.name] = _merge_type(types[f.name], f.type) if f.name in types else f.type
    return pa.schema(list(types.items()))


def schema_for(trials: list[Trial], results_dir: str | Path | None = None) -> pa.Schema:
    """The columns of these trials' rows, merged with those already written under ``results_dir``."""
    values: dict[str, list] = {}
    for t in trials:
        for prefix, params in (("attack.", t.attack.params), ("defense.", t.defense.params)):
            for k, v in params.items():
                values.setdefault(prefix + k, []).append(v)
    params = {k: _kind(v) for k, v in sorted(values.items())}
    outputs = {}
    for name in sorted({t.defense.name for t in trials}):
        for col, kind in DEFENSES.get(name).outputs.items():
            outputs[col] = _merge_type(outputs[col], _OUTPUT_TYPES[kind]) if col in outputs else _OUTPUT_TYPES[kind]
    schema = pa.schema([*BASE_COLUMNS.items(), *outputs.items(), *params.items()])
    existing = [pq.read_schema(p) for p in _parts(Path(results_dir))] if results_dir else []
    return _unified([schema, *existing]) if existing else schema


def _cell(v, typ: pa.DataType):
    if v is None:
        return None
    if pa.types.is_string(typ) and not isinstance(v, str):
        return json.dumps(v)  # e.g. target 0 beside 'all', position [27, 27]
    if pa.types.is_floating(typ):
        return float(v)
    return v


class ResultsWriter:
    def __init__(self, results_dir: str | Path, schema: pa.Schema, *, flush_rows: int = 256, flush_seconds: float | None = None):
        self.dir = Path(results_dir) / "trials"
        self.dir.mkdir(parents=True, exist_ok=True)
        # One schema for every part on disk while this run writes: pyarrow (pandas.read_parquet of the
        # folder) takes a folder's schema from one part, so a part whose column has another type (a null
        # column of imported rows) fails the read and a part's extra columns (new parameters) are dropped.
        # (Column order alone does not matter: pyarrow matches columns by name.)
        existing = [pq.read_schema(p) for p in _parts(self.dir.parent)]
        schema = _unified([schema, *existing])
        if any(_types(s) != _types(schema) for s in existing):
            compact(self.dir.parent, schema=schema)
        if flush_seconds is None:  # rows reach disk at least this often (a killed driver loses no more)
            flush_seconds = float(os.environ.get("BDSWEEP_FLUSH_SECONDS", 2))
        self.schema, self.flush_rows, self.flush_seconds = schema, flush_rows, flush_seconds
        self.run_id, self.parts, self.rows, self.last_flush = uuid.uuid4().hex[:8], 0, [], time.monotonic()

    def add(self, row: dict) -> bool:
        """Buffer a row; returns True when it caused a flush to disk."""
        self.rows.append({name: _cell(row.get(name), typ) for name, typ in zip(self.schema.names, self.schema.types)})
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()
            return True
        return False

    def flush(self) -> list[dict]:
        rows, self.rows, self.last_flush = self.rows, [], time.monotonic()
        if rows:
            _write_part(pa.Table.from_pylist(rows, schema=self.schema),
                        self.dir / f"part-{self.run_id}-{self.parts:05d}.parquet")
            self.parts += 1
        return rows

    def close(self) -> None:
        self.flush()
        compact(self.dir.parent)


def _write_part(table: pa.Table, path: Path) -> None:
    """Write a part file whole under a hidden name, then rename it: a crash never leaves half a part."""
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.rename(path)


def _parts(results_dir: Path) -> list[Path]:
    return sorted((Path(results_dir) / "trials").glob("part-*.parquet"))


def _types(schema: pa.Schema) -> dict[str, pa.DataType]:
    return {f.name: f.type for f in schema}


def _read_all(results_dir: Path, schema: pa.Schema | None = None) -> pa.Table | None:
    """Every part as one table; parts written by different runs may differ in columns and types. ``schema``
    (a superset of the parts' columns, as ``_unified`` gives): the table's, instead of the parts' merge."""
    tables = [pq.read_table(p) for p in _parts(results_dir)]
    if not tables:
        return None
    schema = _unified([t.schema for t in tables]) if schema is None else schema
    return pa.concat_tables([_conform(t, schema) for t in tables])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            cols.append(pa.nulls(len(table), f.type))
        elif table.schema.field(f.name).type == f.type:
            cols.append(table[f.name])
        elif pa.types.is_string(f.type) and not _is_text(table.schema.field(f.name).type):
            # JSON text, as _cell writes mixed values (50 -> "50", 0.05 -> "0.05", True -> "true"). A whole
            # float is written as the int it was: pandas reads an int column with nulls back as float64, so
            # rows that went through pandas (a committed trials.parquet) hold 100.0 for clean_size 100.
            cols.append(pa.array([None if v is None else json.dumps(int(v) if isinstance(v, float) and v.is_integer() else v)
                                  for v in table[f.name].to_pylist()], pa.string()))
        else:
            cols.append(table[f.name].cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def compact(results_dir: str | Path, edit=None, schema: pa.Schema | None = None) -> None:
    """Merge all part files into one, one row per trial (the latest), atomically replacing the parts.
    ``edit(df)`` may change the rows' values first (a search's ranks), in the same rewrite; ``schema`` (a
    superset of the parts' columns, as ``_unified`` gives) is the merged part's, even for a single part."""
    results_dir = Path(results_dir)
    parts = _parts(results_dir)
    if len(parts) <= 1 and edit is None and schema is None:
        return
    table = _read_all(results_dir, schema)
    if table is None:
        return
    df = _dedupe(table.to_pandas())
    if edit is not None:
        df = edit(df)
    _write_part(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False),
                results_dir / "trials" / f"part-{uuid.uuid4().hex[:8]}-compact.parquet")
    for p in parts:
        p.unlink()


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("finished_at", kind="stable").drop_duplicates("trial_id", keep="last").reset_index(drop=True)


# What a file must hold to be trial rows: a run skips by trial_id, keeps the latest by finished_at.
IMPORT_COLUMNS = ("trial_id", "status", "finished_at", "model_key", "attack", "defense", "seed")


def _read_rows(source: Path) -> pa.Table:
    """Trial rows from a Parquet file, a ``trials`` folder of parts, or a results directory."""
    if source.is_file():
        return pq.read_table(source)
    base = source.parent if source.name == "trials" else source
    table = _read_all(base)
    if table is None:
        raise ValueError(f"{source}: no part-*.parquet under {base / 'trials'}")
    return table


def import_rows(results_dir: str | Path, sources: list[str | Path]) -> tuple[int, int]:
    """Add trial rows from elsewhere (a piece's committed Parquet, another machine's results) to
    ``results_dir``, so that a run there skips the trials they hold: on a new machine the committed rows of
    a day-long spec say what is done. Every source is read and checked before anything is written; each is
    then one part file (written whole, then renamed), compacted with the rest: a row already here is
    replaced only by a later one (``finished_at``), so importing twice changes nothing.
    Returns (rows read, trial ids new to ``results_dir``)."""
    results_dir = Path(results_dir)
    tables = []
    for src in map(Path, sources):
        try:
            table = _read_rows(src)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{src}: not readable as Parquet trial rows ({e})") from e
        missing = [c for c in IMPORT_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{src}: not trial rows, no column {', '.join(missing)}")
        tables.append(table)
    before = finished_trials(results_dir)
    out = results_dir / "trials"
    out.mkdir(parents=True, exist_ok=True)
    ids: set[str] = set()
    for table in tables:
        _write_part(table, out / f"part-{uuid.uuid4().hex[:8]}-import.parquet")
        ids |= set(table["trial_id"].to_pylist())
    compact(results_dir)
    return sum(len(t) for t in tables), len(ids - before)


def finished_trials(results_dir: str | Path, include_failed: bool = True) -> set[str]:
    """Trial ids already in the results (the ones a re-run or resume skips)."""
    table = _read_all(Path(results_dir))
    if table is None:
        return set()
    df = table.select(["trial_id", "status"]).to_pandas()
    if not include_failed:
        df = df[df.status == "ok"]
    return set(df.trial_id)


# Nullable pandas dtypes, so an int parameter absent from some rows stays an int column.
_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


def load(results_dir: str | Path) -> pd.DataFrame:
    """All trial rows of a results directory as a DataFrame, one row per trial, typed columns."""
    table = _read_all(Path(results_dir))
    if table is None:
        raise FileNotFoundError(f"no trial results under {Path(results_dir) / 'trials'}")
    return _dedupe(table.to_pandas(types_mapper=_NULLABLE.get))

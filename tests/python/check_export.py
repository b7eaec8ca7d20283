#!/usr/bin/env python3
"""Check a `monoscope export` folder against its layout contract.

    py=$(bash scripts/python-env.sh)
    "$py" tests/python/check_export.py EXPORT_DIR

First with pyarrow, file by file: manifest.json (complete, schema_version 1, field types,
consecutive shard ranges within document_count), no leftover temporary files, and for every
file the manifest lists: its sha256, its row count (Parquet metadata and an actual read), its
exact Arrow schema, ZSTD compression, and its contents (activations non-zero, finite, feature <
d_sae, strictly sorted by (doc_id, position, feature); tokens strictly sorted by (doc_id,
position) with positions 0, 1, ... in every document; doc ids inside the shard's [first_doc,
end_doc); features 0..d_sae-1 with density in [0, 1]). Then with DuckDB, straight on the
Parquet files: the totals, the join of activations with tokens on (doc_id, position), and each
feature's density, mean and max recomputed from the activations against features.parquet.

Prints a short summary and a sample join and exits 0 when every check passes; otherwise prints
one `FAIL <file>: <check>: <detail>` line per failure on stderr and exits 1.
"""

import argparse
import hashlib
import json
import re
import sys
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
BATCH_ROWS = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CONTENT_HASH = re.compile(r"sha256:[0-9a-f]{64}")
DENSITY_TOL = 1e-9  # absolute
MAX_REL_TOL = 1e-6  # relative: the same float32 values, so this is equality up to rounding
MEAN_REL_TOL = 1e-4  # relative: the exporter may sum in a different order or precision

ACTIVATION_KEY = ("doc_id", "position", "feature")  # the sort key, unique per row
TOKEN_KEY = ("doc_id", "position")
# (name, type) of every column, in order; all of them non-null except the list columns.
ACTIVATIONS_COLUMNS = [
    ("doc_id", pa.uint64()),
    ("position", pa.uint32()),
    ("feature", pa.uint32()),
    ("activation", pa.float32()),
]
TOKENS_COLUMNS = [
    ("doc_id", pa.uint64()),
    ("position", pa.uint32()),
    ("token_id", pa.uint32()),
    ("token", pa.string()),
]
FEATURES_COLUMNS = [
    ("feature", pa.uint32()),
    ("density", pa.float64()),
    ("mean_activation", pa.float32()),
    ("max_activation", pa.float32()),
    ("top_logits", pa.list_(pa.string())),
    ("bottom_logits", pa.list_(pa.string())),
]

# Manifest fields that must be present, with their JSON types (bool is not an int here).
MANIFEST_FIELDS = {
    ("model", "dir"): str,
    ("model", "content_hash"): str,
    ("hook",): str,
    ("sae", "dir"): str,
    ("sae", "content_hash"): str,
    ("sae", "architecture"): str,
    ("sae", "d_in"): int,
    ("sae", "d_sae"): int,
    ("corpus",): str,
    ("context_size",): int,
    ("prepend_bos",): bool,
    ("document_count",): int,
    ("token_count",): int,
    ("activation_count",): int,
    ("shards",): list,
    ("features",): dict,
}

# Per feature, features.parquet's statistics next to the same recomputed from the activations,
# for the features where they differ (a feature that never fires has no activation rows: 0).
COMPARE_FEATURES_SQL = """
    WITH recomputed AS (
        SELECT feature, count(DISTINCT (doc_id, position)) / $tokens AS density,
               avg(activation) AS mean_activation, max(activation) AS max_activation
        FROM acts GROUP BY feature),
    compared AS (
        SELECT f.feature, f.density, coalesce(r.density, 0) AS density_re,
               f.mean_activation, coalesce(r.mean_activation, 0) AS mean_re,
               f.max_activation, coalesce(r.max_activation, 0) AS max_re
        FROM features f LEFT JOIN recomputed r USING (feature))
    SELECT * FROM compared
    WHERE abs(density - density_re) >= $density_tol
       OR abs(mean_activation - mean_re)
          > $mean_tol * greatest(abs(mean_activation), abs(mean_re))
       OR abs(max_activation - max_re) > $max_tol * greatest(abs(max_activation), abs(max_re))
    ORDER BY feature
"""


class CheckFailed(Exception):
    """A failed check: the file it concerns (relative to the export), the check, the detail."""

    def __init__(self, file: str, check: str, detail: str):
        super().__init__(f"{file}: {check}: {detail}")


def require(ok: bool, file: str, check: str, detail: str) -> None:
    """Raise CheckFailed(file, check, detail) unless ok."""
    if not ok:
        raise CheckFailed(file, check, detail)


def sql_string(text: str) -> str:
    """`text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sha256_of(path: Path) -> str:
    """Lowercase hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifest and folder


def load_manifest(root: Path) -> dict:
    """Read manifest.json and check its version, completeness, field types and shard ranges."""
    path = root / MANIFEST
    require(path.is_file(), MANIFEST, "exists", f"no {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckFailed(MANIFEST, "valid JSON", str(e)) from e
    require(isinstance(manifest, dict), MANIFEST, "valid JSON", "not a JSON object")
    require(
        manifest.get("schema_version") == 1,
        MANIFEST,
        "schema_version",
        f"expected 1, found {manifest.get('schema_version')!r}",
    )
    require(
        manifest.get("complete") is True,
        MANIFEST,
        "complete",
        f"expected true, found {json.dumps(manifest.get('complete'))} (unfinished export?)",
    )
    for keys, kind in MANIFEST_FIELDS.items():
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        name = ".".join(keys)
        require(
            type(value) is kind,
            MANIFEST,
            f"field {name}",
            f"expected a JSON {kind.__name__}, found {value!r}",
        )
        if kind is int:
            require(value >= 0, MANIFEST, f"field {name}", f"negative: {value}")
    for part in ("model", "sae"):
        content_hash = manifest[part]["content_hash"]
        require(
            CONTENT_HASH.fullmatch(content_hash) is not None,
            MANIFEST,
            f"field {part}.content_hash",
            f"expected 'sha256:<64 lowercase hex>', found {content_hash!r}",
        )
    require(manifest["sae"]["d_sae"] > 0, MANIFEST, "field sae.d_sae", "must be positive")
    check_shard_ranges(manifest)
    entries = file_entries(manifest)
    paths = [entry["path"] for _, entry in entries]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    require(not duplicates, MANIFEST, "distinct file paths", f"listed twice: {duplicates}")
    return manifest


def check_shard_ranges(manifest: dict) -> None:
    """Shards cover consecutive, non-empty doc ranges, within the document_count documents
    read (documents without tokens, e.g. empty ones, may start or end the export)."""
    shards = manifest["shards"]
    require(len(shards) > 0, MANIFEST, "shards", "no shards")
    end = None
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        require(isinstance(shard, dict), MANIFEST, where, "not an object")
        first_doc, end_doc = shard.get("first_doc"), shard.get("end_doc")
        require(
            type(first_doc) is int and type(end_doc) is int and 0 <= first_doc < end_doc,
            MANIFEST,
            f"{where} doc range",
            f"expected integers 0 <= first_doc < end_doc, found {first_doc!r}, {end_doc!r}",
        )
        require(
            end is None or first_doc == end,
            MANIFEST,
            f"{where} doc range",
            f"first_doc {first_doc} does not continue the previous shard's end_doc {end}",
        )
        end = end_doc
    require(
        end <= manifest["document_count"],
        MANIFEST,
        "document_count",
        f"the last shard ends at document {end}, document_count is {manifest['document_count']}",
    )


def file_entries(manifest: dict) -> list:
    """Every file entry as (kind, entry), kind in activations / tokens / features, after
    checking its path, rows and sha256 fields."""
    entries = []
    for i, shard in enumerate(manifest["shards"]):
        for kind in ("activations", "tokens"):
            entries.append((kind, shard.get(kind), f"shards[{i}].{kind}"))
    entries.append(("features", manifest["features"], "features"))
    checked = []
    for kind, entry, where in entries:
        require(isinstance(entry, dict), MANIFEST, where, "missing or not an object")
        path, rows, sha = entry.get("path"), entry.get("rows"), entry.get("sha256")
        require(type(path) is str, MANIFEST, f"{where}.path", f"not a string: {path!r}")
        parts = Path(path).parts
        expected_dir = () if kind == "features" else (kind,)
        require(
            parts[:-1] == expected_dir and path.endswith(".parquet") and "\\" not in path,
            MANIFEST,
            f"{where}.path",
            f"expected a .parquet file directly under {'/'.join(expected_dir) or 'the export'}"
            f", found {path!r}",
        )
        require(
            type(rows) is int and rows >= 0,
            MANIFEST,
            f"{where}.rows",
            f"not a non-negative integer: {rows!r}",
        )
        require(
            type(sha) is str and SHA256_HEX.fullmatch(sha) is not None,
            MANIFEST,
            f"{where}.sha256",
            f"expected 64 lowercase hex digits, found {sha!r}",
        )
        checked.append((kind, entry))
    return checked


def check_folder(root: Path, manifest: dict) -> None:
    """No temporary (dot-named) files anywhere, and no Parquet file in activations/ or tokens/
    that the manifest does not list (the DuckDB globs would read it)."""
    hidden = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    require(
        not hidden,
        hidden[0] if hidden else ".",
        "no temporary files",
        f"{len(hidden)} dot-named leftovers: {hidden[:5]}",
    )
    listed = {entry["path"] for _, entry in file_entries(manifest)}
    for kind in ("activations", "tokens"):
        present = {f"{kind}/{p.name}" for p in (root / kind).glob("*.parquet")}
        extra = sorted(present - listed)
        require(
            not extra,
            extra[0] if extra else kind,
            "listed in the manifest",
            f"{len(extra)} unlisted Parquet files in {kind}/: {extra[:5]}",
        )


# ---------------------------------------------------------------------------------------------
# Files, with pyarrow


def open_parquet(root: Path, entry: dict, columns: list) -> pq.ParquetFile:
    """Check existence, sha256, metadata row count, exact schema and ZSTD compression."""
    name = entry["path"]
    path = root / name
    require(path.is_file(), name, "exists", f"listed in the manifest but missing: {path}")
    digest = sha256_of(path)
    require(
        digest == entry["sha256"],
        name,
        "sha256",
        f"file has {digest}, manifest says {entry['sha256']}",
    )
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CheckFailed(name, "readable Parquet", str(e)) from e
    meta = pf.metadata
    require(
        meta.num_rows == entry["rows"],
        name,
        "row count (Parquet metadata)",
        f"file has {meta.num_rows} rows, manifest says {entry['rows']}",
    )
    check_schema(name, pf.schema_arrow, columns)
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(rg).column(c)
            require(
                chunk.compression == "ZSTD",
                name,
                "ZSTD compression",
                f"row group {rg}, column {chunk.path_in_schema} is {chunk.compression}",
            )
    return pf


def check_schema(name: str, schema: pa.Schema, columns: list) -> None:
    """Exact column names, order and types; scalar columns non-null; lists of utf8 strings."""
    found, wanted = schema.names, [n for n, _ in columns]
    require(found == wanted, name, "schema columns", f"expected {wanted}, found {found}")
    for field, (col, kind) in zip(schema, columns):
        if pa.types.is_list(kind):
            ok = pa.types.is_list(field.type) and field.type.value_type == kind.value_type
        else:
            ok = field.type == kind and not field.nullable
        require(
            ok,
            name,
            f"schema of column {col}",
            f"expected {kind}{'' if pa.types.is_list(kind) else ' not null'}, found "
            f"{field.type}{' not null' if not field.nullable else ' (nullable)'}",
        )


def require_none(mask: np.ndarray, file: str, check: str, describe) -> None:
    """Raise CheckFailed if any entry of a boolean array is True, describing the first one as
    describe(index) says (and counting the others, within this batch of rows)."""
    hits = np.flatnonzero(mask)
    if hits.size:
        more = f" [{hits.size - 1} more like it]" if hits.size > 1 else ""
        raise CheckFailed(file, check, describe(int(hits[0])) + more)


def key_text(cols: dict, i: int, names: tuple) -> str:
    """Row i's values of the named columns, as `doc_id 3, position 7`."""
    return ", ".join(f"{n} {cols[n][i]}" for n in names)


def batches(pf: pq.ParquetFile, names: tuple, before: tuple):
    """Yield (columns, predecessors, first row number) per non-empty batch of the file.
    columns maps each name to a NumPy array (integers widened to int64); predecessors holds the
    same columns shifted down one row, so that each row can be compared with the row before
    it, across batches too, the file's first row getting `before` as its predecessor."""
    start = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(names)):
        if not batch.num_rows:
            continue
        cols = {}
        for n in names:
            values = batch.column(n).to_numpy()
            cols[n] = values.astype(np.int64) if values.dtype.kind in "ui" else values
        prev = {n: np.concatenate([[b], cols[n][:-1]]) for n, b in zip(names, before)}
        yield cols, prev, start
        before = tuple(cols[n][-1] for n in names)
        start += batch.num_rows


def check_activations(pf: pq.ParquetFile, name: str, shard: dict, d_sae: int) -> int:
    """Non-zero finite activations, feature < d_sae, doc ids in the shard's range, strictly
    sorted by (doc_id, position, feature). Returns the number of rows read."""
    rows = 0
    names = ACTIVATION_KEY + ("activation",)
    for cols, prev, start in batches(pf, names, before=(-1, 0, 0, 0.0)):
        check_activation_batch(name, cols, prev, start, shard, d_sae)
        rows += len(cols["doc_id"])
    return rows


def check_activation_batch(
    name: str, cols: dict, prev: dict, start: int, shard: dict, d_sae: int
) -> None:
    """check_activations on one batch of rows (see batches)."""
    doc, feature, act = cols["doc_id"], cols["feature"], cols["activation"]
    first_doc, end_doc = shard["first_doc"], shard["end_doc"]

    def row(i: int) -> str:
        return f"row {start + i} ({key_text(cols, i, ACTIVATION_KEY)})"

    require_none(
        ~np.isfinite(act) | (act == 0),
        name,
        "activations non-zero and finite",
        lambda i: f"{row(i)} has activation {act[i]}",
    )
    require_none(feature >= d_sae, name, "feature < d_sae", lambda i: f"{row(i)}, d_sae is {d_sae}")
    require_none(
        (doc < first_doc) | (doc >= end_doc),
        name,
        "doc_id in the shard's range",
        lambda i: f"{row(i)} is outside [{first_doc}, {end_doc})",
    )
    greater = np.zeros(len(doc), dtype=bool)
    equal = np.ones(len(doc), dtype=bool)
    for k in ACTIVATION_KEY:  # lexicographic comparison with the row before
        greater |= equal & (cols[k] > prev[k])
        equal &= cols[k] == prev[k]
    require_none(
        equal,
        name,
        "no duplicate (doc_id, position, feature)",
        lambda i: f"{row(i)} repeats the row before it",
    )
    require_none(
        ~greater,
        name,
        "sorted by (doc_id, position, feature)",
        lambda i: f"{row(i)} comes after ({key_text(prev, i, ACTIVATION_KEY)})",
    )


def check_tokens(pf: pq.ParquetFile, name: str, shard: dict) -> int:
    """Doc ids in the shard's range, rows strictly sorted by (doc_id, position) with positions
    0, 1, 2, ... within each document. Returns the number of rows read."""
    rows = 0
    for cols, prev, start in batches(pf, TOKEN_KEY, before=(-1, 0)):
        check_token_batch(name, cols, prev, start, shard)
        rows += len(cols["doc_id"])
    return rows


def check_token_batch(name: str, cols: dict, prev: dict, start: int, shard: dict) -> None:
    """check_tokens on one batch of rows (see batches)."""
    doc, pos = cols["doc_id"], cols["position"]
    first_doc, end_doc = shard["first_doc"], shard["end_doc"]

    def row(i: int) -> str:
        return f"row {start + i} ({key_text(cols, i, TOKEN_KEY)})"

    require_none(
        (doc < first_doc) | (doc >= end_doc),
        name,
        "doc_id in the shard's range",
        lambda i: f"{row(i)} is outside [{first_doc}, {end_doc})",
    )
    ok = np.where(
        doc == prev["doc_id"],
        pos == prev["position"] + 1,
        (doc > prev["doc_id"]) & (pos == 0),
    )
    require_none(
        ~ok,
        name,
        "sorted by (doc_id, position), positions 0, 1, 2, ... per document",
        lambda i: (
            f"{row(i)} comes after "
            + (
                f"({key_text(prev, i, TOKEN_KEY)})"
                if prev["doc_id"][i] >= 0
                else "the start of the file"
            )
        ),
    )


def check_features(pf: pq.ParquetFile, name: str, d_sae: int) -> int:
    """One row per feature 0..d_sae-1 in order, density in [0, 1], finite statistics, and
    mean_activation 0 for a feature that never fires. Returns the number of rows read."""
    table = pf.read()
    require(
        table.num_rows == d_sae,
        name,
        "one row per feature",
        f"{table.num_rows} rows, d_sae is {d_sae}",
    )
    feature, density, mean, max_ = (
        table.column(n).to_numpy()
        for n in ("feature", "density", "mean_activation", "max_activation")
    )
    require_none(
        feature != np.arange(d_sae),
        name,
        "feature = 0..d_sae-1 in order",
        lambda i: f"row {i} has feature {feature[i]}",
    )
    require_none(
        ~((density >= 0) & (density <= 1)),
        name,
        "density in [0, 1]",
        lambda i: f"feature {i} has density {density[i]}",
    )
    require_none(
        ~(np.isfinite(mean) & np.isfinite(max_)),
        name,
        "mean_activation and max_activation finite",
        lambda i: f"feature {i} has mean_activation {mean[i]}, max_activation {max_[i]}",
    )
    require_none(
        (density == 0) & (mean != 0),
        name,
        "mean_activation 0 for a dead feature",
        lambda i: f"feature {i} has density 0 and mean_activation {mean[i]}",
    )
    return table.num_rows


def check_file(root: Path, entry: dict, columns: list, check_contents) -> int:
    """All the checks on one listed file: open_parquet's, then check_contents(pf, path), which
    returns the rows it read. Returns that row count."""
    pf = open_parquet(root, entry, columns)
    rows = check_contents(pf, entry["path"])
    require(
        rows == entry["rows"],
        entry["path"],
        "row count (read)",
        f"read {rows} rows, manifest says {entry['rows']}",
    )
    return rows


def check_files(root: Path, manifest: dict) -> list:
    """Check every listed file, then the row totals; returns the failures (one per file at
    most: a file's first failed check)."""
    d_sae = manifest["sae"]["d_sae"]
    files = []
    for shard in manifest["shards"]:
        files.append(
            (
                "activations",
                shard["activations"],
                ACTIVATIONS_COLUMNS,
                partial(check_activations, shard=shard, d_sae=d_sae),
            )
        )
        files.append(
            ("tokens", shard["tokens"], TOKENS_COLUMNS, partial(check_tokens, shard=shard))
        )
    files.append(
        ("features", manifest["features"], FEATURES_COLUMNS, partial(check_features, d_sae=d_sae))
    )
    failures = []
    totals = {"activations": 0, "tokens": 0, "features": 0}
    for kind, entry, columns, check_contents in files:
        try:
            totals[kind] += check_file(root, entry, columns, check_contents)
        except CheckFailed as e:
            failures.append(e)
    if failures:
        return failures
    for kind, key in (("activations", "activation_count"), ("tokens", "token_count")):
        if totals[kind] != manifest[key]:
            failures.append(
                CheckFailed(
                    MANIFEST,
                    key,
                    f"the {kind} files hold {totals[kind]} rows, {key} is {manifest[key]}",
                )
            )
    return failures


# ---------------------------------------------------------------------------------------------
# The whole export, with DuckDB


def duckdb_views(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views acts, tokens and features over the export's files."""
    con = duckdb.connect()
    for view, pattern in (
        ("acts", "activations/*.parquet"),
        ("tokens", "tokens/*.parquet"),
        ("features", "features.parquet"),
    ):
        con.execute(
            f"CREATE VIEW {view} AS SELECT * FROM read_parquet({sql_string(str(root / pattern))})"
        )
    return con


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params=None):
    """The first column of the first row of a query's result, or None when it has no rows."""
    rows = con.execute(sql, params).fetchall()
    return rows[0][0] if rows else None


def check_with_duckdb(con: duckdb.DuckDBPyConnection, manifest: dict) -> None:
    """Totals, the activation-token join, and per-feature density / mean / max recomputed."""
    acts_glob, tokens_glob = "activations/*.parquet", "tokens/*.parquet"
    n_acts = scalar(con, "SELECT count(*) FROM acts")
    require(
        n_acts == manifest["activation_count"],
        acts_glob,
        "DuckDB row count",
        f"{n_acts} rows, activation_count is {manifest['activation_count']}",
    )
    n_tokens = scalar(con, "SELECT count(*) FROM tokens")
    require(
        n_tokens == manifest["token_count"],
        tokens_glob,
        "DuckDB row count",
        f"{n_tokens} rows, token_count is {manifest['token_count']}",
    )
    orphans = con.execute(
        "SELECT doc_id, position, feature FROM acts ANTI JOIN tokens USING (doc_id, position)"
    ).fetchall()
    if orphans:
        doc, pos, feature = orphans[0]
        raise CheckFailed(
            acts_glob,
            "every activation has a token",
            f"{len(orphans)} activations have no (doc_id, position) in "
            f"{tokens_glob}, the first: doc_id {doc}, position {pos}, feature {feature}",
        )
    joined = scalar(con, "SELECT count(*) FROM acts JOIN tokens USING (doc_id, position)")
    require(
        joined == n_acts,
        acts_glob,
        "every activation joins exactly one token",
        f"the join has {joined} rows for {n_acts} activations",
    )
    mismatches = con.execute(
        COMPARE_FEATURES_SQL,
        {
            "tokens": max(n_tokens, 1),
            "density_tol": DENSITY_TOL,
            "max_tol": MAX_REL_TOL,
            "mean_tol": MEAN_REL_TOL,
        },
    ).fetchall()
    if mismatches:
        raise CheckFailed(
            manifest["features"]["path"],
            "density, mean_activation and max_activation match the activations",
            f"{len(mismatches)} features differ, e.g. "
            + "; ".join(
                f"feature {f}: density {d!r} (recomputed {dr!r}), mean_activation {m!r} ({mr!r}),"
                f" max_activation {x!r} ({xr!r})"
                for f, d, dr, m, mr, x, xr in mismatches[:3]
            ),
        )


def print_summary(root: Path, manifest: dict, con: duckdb.DuckDBPyConnection) -> None:
    """The export in a few lines, and a sample join: the top 5 tokens of the most frequent
    feature."""
    sae = manifest["sae"]
    n_tokens, n_acts = manifest["token_count"], manifest["activation_count"]
    dead = scalar(con, "SELECT count(*) FROM features WHERE density = 0")
    print(
        f"export {root}: hook {manifest['hook']}, SAE {sae['architecture']} "
        f"d_in {sae['d_in']} d_sae {sae['d_sae']}, corpus {manifest['corpus']}"
    )
    with_tokens = scalar(con, "SELECT count(DISTINCT doc_id) FROM tokens")
    print(
        f"  {len(manifest['shards'])} shards, {manifest['document_count']} documents read "
        f"({with_tokens} with tokens), "
        f"{n_tokens} tokens, {n_acts} activations "
        f"({n_acts / max(n_tokens, 1):.2f} per token)"
    )
    print(f"  features: {sae['d_sae'] - dead} fire at least once, {dead} never")
    feature, density = con.execute(
        "SELECT feature, density FROM features ORDER BY density DESC, feature LIMIT 1"
    ).fetchall()[0]
    if density == 0:
        print("  (no feature fires, so there is no sample join to show)")
        return
    print(
        f"sample join: the top 5 activations of feature {feature} "
        f"(the most frequent, fires on {100 * density:.2f}% of tokens)"
    )
    rows = con.execute(
        """SELECT a.doc_id, a.position, a.activation, t.token_id, t.token
           FROM acts a JOIN tokens t USING (doc_id, position)
           WHERE a.feature = ? ORDER BY a.activation DESC, a.doc_id, a.position LIMIT 5""",
        [feature],
    ).fetchall()
    for doc, pos, act, token_id, token in rows:
        print(
            f"  doc {doc:>6} position {pos:>4} activation {act:9.4f} token {token_id:>6} {token!r}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="the folder `monoscope export --out` wrote")
    root = parser.parse_args().export_dir.resolve()
    try:
        require(root.is_dir(), str(root), "exists", "not a folder")
        manifest = load_manifest(root)
        check_folder(root, manifest)
    except CheckFailed as e:
        failures = [e]
    else:
        failures = check_files(root, manifest)
    if not failures:
        con = duckdb_views(root)
        try:
            check_with_duckdb(con, manifest)
        except CheckFailed as e:
            failures.append(e)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        print(f"{root}: {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print_summary(root, manifest, con)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

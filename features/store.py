"""Streamrec's door to Feast: configuration, ``apply``, fast online writes and reads, offline log.

Configuration
    ``feature_repo/feature_store.yaml`` is the one declaration of the store. :func:`repo_config`
    reads it, fills ``${STREAMREC_HOME}`` from :class:`~streamrec.settings.Settings` (so the
    default home needs no exported variable) and swaps in Redis when ``online_store=redis``.
    ``repo_path`` is the home: the definitions name their Parquet folders relative to it.

Writes
    ``FeatureStore.push`` turns rows into a DataFrame, an Arrow table and ValueProtos, then
    Feast's SQLite store upserts one statement per feature: 2,000-3,000 user rows/s here.
    The stream needs several times that, so :class:`OnlineFeatureWriter` produces Feast's
    storage format itself: entity keys in Feast's serialization v3, every value the
    serialized ``ValueProto`` Feast would store (cached for repeated counts and strings),
    then one ``executemany`` upsert into the view's SQLite table, or, on Redis, one pipeline
    reading the stored timestamps and one of ``HSET`` into the hashes of Feast's Redis
    store. It shares Feast's table names, hash fields and Redis client. The tests check that
    ``FeatureStore.push`` stores the very same bytes and that ``get_online_features`` reads
    back what was written; the layout is Feast 0.67's, so a Feast upgrade must pass them.

    A row replaces the stored one when its event timestamp is *newer or equal*. Equal
    matters: a late event changes counts without moving the anchor. (Feast's Redis store
    drops an equal timestamp; its SQLite store overwrites whatever is stored.) Feast's SQLite
    layout keeps whole seconds, so two rows of one entity within a second tie there; within
    one ``write`` call the newest row wins to the microsecond on both stores.

Reads
    ``get_online_features`` for 1 user and 200 items costs tens of milliseconds, mostly
    per-value conversions. :class:`OnlineFeatureReader` resolves the feature service once,
    fetches each entity once per call (one ``SELECT`` per view, or one ``HMGET`` per entity
    for all its views on Redis), decodes values with caches and returns vectors as numpy
    arrays read straight from the protobuf payload.

Offline log
    :meth:`OnlineFeatureWriter.append_offline` adds one Parquet part file, atomically, to
    the push source's batch folder, which ``get_historical_features`` and
    ``materialize`` read.

Examples
--------
>>> import tempfile
>>> from datetime import UTC, datetime
>>> from streamrec.settings import Settings
>>> settings = Settings(home=tempfile.mkdtemp())
>>> apply_repo(settings)  # doctest: +ELLIPSIS
Created project streamrec...
>>> row = {"item_id": "i1", "event_timestamp": datetime(2026, 1, 2, tzinfo=UTC),
...        "views_1h": 3, "clicks_1h": 1, "add_to_carts_1h": 0, "purchases_1h": 0,
...        "impressions_1h": 9, "views_24h": 3, "clicks_24h": 1, "add_to_carts_24h": 0,
...        "purchases_24h": 0, "impressions_24h": 9, "ctr_1h": 0.069, "ctr_24h": 0.069,
...        "last_event_ts": 1767312000.0}
>>> writer = OnlineFeatureWriter(settings)
>>> writer.write("item_realtime", [row])
>>> OnlineFeatureReader(settings).read(["item_realtime:clicks_1h"], {"item_id": ["i1", "i2"]})
{'item_id': ['i1', 'i2'], 'clicks_1h': [1, None]}
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import string
import struct
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from feast import FeatureStore, FeatureView, FileSource, Project, PushSource
from feast.infra.key_encoding_utils import serialize_entity_key_prefix
from feast.infra.online_stores.helpers import _mmh3
from feast.infra.online_stores.redis import _versioned_fv_name
from feast.infra.online_stores.sqlite import _table_id
from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.repo_operations import apply_total_with_repo_instance, parse_repo
from feast.type_map import feast_value_type_to_python_type
from feast.types import Array, FeastType, Float32, Float64, Int64, String
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

from features.definitions import TIMESTAMP_FIELD, epoch_us
from features.packed import PACKED
from streamrec.settings import Settings

__all__ = [
    "RANKER_SERVICE",
    "REPO_DIR",
    "OnlineFeatureReader",
    "OnlineFeatureWriter",
    "apply_repo",
    "feature_store",
    "registry_exists",
    "repo_config",
]

REPO_DIR = Path(__file__).resolve().parent.parent / "feature_repo"
"""The Feast feature repository (definitions and ``feature_store.yaml``)."""

RANKER_SERVICE = "ranker_features"
"""The feature service the ranker trains and serves with (``feature_repo/ranker_features.py``)."""


# --- configuration and apply -------------------------------------------------------------


def _feast_redis_connection(url: str) -> str:
    """Feast's ``host:port,db=N,...`` connection string of a ``redis://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://host:port/db or rediss://..., got {url!r}")
    options = [f"{parts.hostname}:{parts.port or 6379}"]
    db = parts.path.strip("/")
    if db:
        options.append(f"db={int(db)}")
    if parts.username:
        options.append(f"username={unquote(parts.username)}")
    if parts.password:
        options.append(f"password={unquote(parts.password)}")
    if parts.scheme == "rediss":
        options.append("ssl=true")
    return ",".join(options)


def _substitute(value: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, str):
        return string.Template(value).substitute(variables)
    return value


def repo_config(settings: Settings) -> RepoConfig:
    """The Feast configuration of ``feature_repo/feature_store.yaml`` for these settings.

    Examples
    --------
    >>> config = repo_config(Settings(home="/srv/streamrec"))
    >>> config.project, config.online_store.path, str(config.repo_path)
    ('streamrec', '/srv/streamrec/feast/online.db', '/srv/streamrec')
    >>> redis = Settings(online_store="redis", redis_url="redis://cache:6380/2")
    >>> repo_config(redis).online_store.connection_string
    'cache:6380,db=2'
    """
    home = settings.home.resolve()
    declared = yaml.safe_load((REPO_DIR / "feature_store.yaml").read_text())
    raw = _substitute(declared, {"STREAMREC_HOME": str(home)})
    if settings.online_store == "redis":
        raw["online_store"] = {
            "type": "redis",
            "connection_string": _feast_redis_connection(settings.redis_url),
        }
    config = RepoConfig(**raw)
    config.repo_path = home
    return config


def registry_exists(settings: Settings) -> bool:
    """Whether :func:`apply_repo` has run for this home: its registry file exists."""
    return Path(repo_config(settings).registry.path).is_file()


def feature_store(settings: Settings) -> FeatureStore:
    """A Feast ``FeatureStore`` on the applied registry (run :func:`apply_repo` first)."""
    return FeatureStore(config=repo_config(settings))


@contextlib.contextmanager
def _inside_repo() -> Iterator[None]:
    # Feast names each definition module by its path relative to the working directory and
    # imports it by that name, so the repo must be both the cwd and on sys.path.
    cwd, entry = os.getcwd(), str(REPO_DIR)
    sys.path.insert(0, entry)
    os.chdir(REPO_DIR)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path.remove(entry)


def apply_repo(settings: Settings) -> None:
    """Register the definitions of ``feature_repo/`` and create their tables; idempotent.

    Also creates the Parquet folders of every file source (empty until a job or the stream
    fills them) and switches a SQLite online store to write-ahead logging, so that the API
    reads while a worker writes. Changes the working directory while it parses the repo.
    """
    config = repo_config(settings)
    home = config.repo_path  # resolved before the working directory changes
    with _inside_repo():
        repo = parse_repo(REPO_DIR)
    if not repo.projects:
        repo.projects.append(Project(name=config.project))
    (home / "feast").mkdir(parents=True, exist_ok=True)
    for source in repo.data_sources:
        if isinstance(source, FileSource):
            (home / source.path).mkdir(parents=True, exist_ok=True)
    store = FeatureStore(config=config)
    # The folders are empty until data arrives, so validating them would only warn.
    apply_total_with_repo_instance(
        store, config.project, store.registry, repo, skip_source_validation=True
    )
    if config.online_store.type == "sqlite":
        with contextlib.closing(sqlite3.connect(config.online_store.path)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")


# --- Feast's storage format ---------------------------------------------------------------

_Encoded = tuple[bytes, str | None]
"""A value as Feast's SQLite store keeps it: the serialized ValueProto and ``value_text``."""

_NULL: _Encoded = (b"", None)
_CACHE_LIMIT = 4096
"""Entries per feature's value cache (at most ~1 MB): counts, devices and categories repeat,
so a small cache hits; unique values such as timestamps just pass through."""


def _encode_cached(build: Callable[[Any], _Encoded]) -> Callable[[Any], _Encoded]:
    cache: dict[Any, _Encoded] = {}

    def encode(value: Any) -> _Encoded:
        hit = cache.get(value)
        if hit is None:
            if value is None:
                return _NULL
            hit = build(value)
            if len(cache) < _CACHE_LIMIT:
                cache[value] = hit
        return hit

    return encode


def _encode_uncached(build: Callable[[Any], _Encoded]) -> Callable[[Any], _Encoded]:
    def encode(value: Any) -> _Encoded:
        return _NULL if value is None else build(value)

    return encode


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# value_text mirrors Feast's extract_text_and_num: the text of strings and numbers only.
def _int64(value: int) -> _Encoded:
    return ValueProto(int64_val=value).SerializeToString(), str(value)


# A oneof double is always serialized, as its tag and 8 little-endian bytes; building the
# bytes directly costs a fifth of a ValueProto (timestamps and rates are rarely repeated).
_DOUBLE_TAG = _varint_bytes(ValueProto.DESCRIPTOR.fields_by_name["double_val"].number << 3 | 1)
_pack_double = struct.Struct("<d").pack


def _float64(value: float) -> _Encoded:
    value = float(value)  # an int must read back, and print, as the float Feast stores
    return _DOUBLE_TAG + _pack_double(value), str(value)


def _string(value: str) -> _Encoded:
    return ValueProto(string_val=value).SerializeToString(), value


def _string_list(value: Sequence[str]) -> _Encoded:
    return ValueProto(string_list_val=StringList(val=value)).SerializeToString(), None


def _float32_list(value: Any) -> _Encoded:
    values = value.tolist() if hasattr(value, "tolist") else value
    return ValueProto(float_list_val=FloatList(val=values)).SerializeToString(), None


def _float64_list(value: Any) -> _Encoded:
    values = value.tolist() if hasattr(value, "tolist") else value
    return ValueProto(double_list_val=DoubleList(val=values)).SerializeToString(), None


_ENCODERS: list[tuple[FeastType, Callable[[], Callable[[Any], _Encoded]]]] = [
    (Int64, lambda: _encode_cached(_int64)),
    (Float64, lambda: _encode_uncached(_float64)),
    (String, lambda: _encode_cached(_string)),
    (Array(String), lambda: _encode_uncached(_string_list)),
    (Array(Float32), lambda: _encode_uncached(_float32_list)),
    (Array(Float64), lambda: _encode_uncached(_float64_list)),
]

_ARROW_TYPES: list[tuple[FeastType, pa.DataType]] = [
    (Int64, pa.int64()),
    (Float64, pa.float64()),
    (String, pa.string()),
    (Array(String), pa.list_(pa.string())),
    (Array(Float32), pa.list_(pa.float32())),
    (Array(Float64), pa.list_(pa.float64())),
]


def _lookup(table: list[tuple[FeastType, Any]], dtype: FeastType) -> Any:
    # Feast types compare by value but do not all hash, hence a list rather than a dict.
    for declared, found in table:
        if declared == dtype:
            return found
    raise TypeError(f"streamrec does not store Feast type {dtype} yet")


_SCALAR_KINDS = frozenset(
    {"int64_val", "int32_val", "double_val", "float_val", "string_val", "bool_val", "bytes_val"}
)
_LIST_KINDS = frozenset(
    {
        "int64_list_val",
        "int32_list_val",
        "double_list_val",
        "float_list_val",
        "string_list_val",
        "bool_list_val",
        "bytes_list_val",
    }
)


def _decode(blob: bytes) -> Any:
    """The Python value ``get_online_features(...).to_dict()`` gives for a stored value."""
    value = ValueProto.FromString(blob)
    kind = value.WhichOneof("val")
    if kind in _SCALAR_KINDS:
        return getattr(value, kind)
    if kind in _LIST_KINDS:
        return list(getattr(value, kind).val)
    # Nulls, timestamps, maps, sets: Feast's own conversion.
    return feast_value_type_to_python_type(value)


_Column = Sequence[bytes | None]
"""One feature's stored values over the entities of a read (``None``: no value)."""
_MISS = object()


def _decode_cached() -> Callable[[_Column], list[Any]]:
    """Decodes columns of immutable values, memoised by their bytes: counts, categories and
    devices repeat, so most values are one dictionary lookup (done in C, by ``map``)."""
    cache: dict[bytes | None, Any] = {None: None}

    def decode(blobs: _Column) -> list[Any]:
        values = list(map(cache.get, blobs, repeat(_MISS)))
        if _MISS in values:
            if len(cache) > _CACHE_LIMIT:
                cache.clear()
                cache[None] = None
            for i, value in enumerate(values):
                if value is _MISS:
                    blob = blobs[i]
                    values[i] = cache[blob] = _decode(blob)
        return values

    return decode


def _each(decode: Callable[[bytes], Any]) -> Callable[[_Column], list[Any]]:
    """A column decoder from a value decoder (values that must not be shared: lists)."""
    return lambda blobs: [None if blob is None else decode(blob) for blob in blobs]


def _varint(blob: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = blob[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _length_delimited_tag(descriptor: Any, field: str) -> bytes:
    return _varint_bytes(descriptor.fields_by_name[field].number << 3 | 2)


_PACKED_TAG = _length_delimited_tag(FloatList.DESCRIPTOR, "val")  # DoubleList's too
_LIST_TAGS = {
    np.dtype("<f4"): _length_delimited_tag(ValueProto.DESCRIPTOR, "float_list_val"),
    np.dtype("<f8"): _length_delimited_tag(ValueProto.DESCRIPTOR, "double_list_val"),
}


def _packed_start(blob: bytes, dtype: np.dtype) -> int | None:
    """Where the payload of a serialized packed ``float_list_val`` (float32) or
    ``double_list_val`` (float64) starts, if ``blob`` is one."""
    tag = _LIST_TAGS[dtype]
    if not blob.startswith(tag):
        return None
    try:
        length, at = _varint(blob, len(tag))
        if at + length != len(blob) or not blob.startswith(_PACKED_TAG, at):
            return None
        size, at = _varint(blob, at + len(_PACKED_TAG))
    except IndexError:
        return None
    return at if at + size == len(blob) and size % dtype.itemsize == 0 else None


def _vector_decoder(dtype: np.dtype) -> Callable[[bytes], np.ndarray | None]:
    """Decodes an ``Array(Float32)`` or ``Array(Float64)`` value into an array of ``dtype``.

    A 384-float Python list costs ~30 µs to build, and serving reads two vectors for each of
    200 candidates; the packed payload of the protobuf is the array already. Vectors of one
    dimension share their header bytes, so the header is parsed once per blob length.
    """
    headers: dict[int, bytes] = {}

    def decode(blob: bytes) -> np.ndarray | None:
        header = headers.get(len(blob))
        if header is None or not blob.startswith(header):
            start = _packed_start(blob, dtype)
            if start is None:  # empty, null or unpacked: let protobuf parse it
                value = _decode(blob)
                return None if value is None else np.asarray(value, dtype=dtype)
            header = headers[len(blob)] = blob[:start]
        return np.frombuffer(blob, dtype=dtype, offset=len(header)).copy()

    return decode


def _vector_column_decoder(dtype: np.dtype) -> Callable[[_Column], list[Any]]:
    """Decodes a column of ``Array(Float32)`` / ``Array(Float64)`` values into arrays.

    Serving reads the packed ``item_realtime`` vector of every missed candidate: the
    payloads of a column's vectors of one length (one header) are joined into one buffer
    and converted at once, each value then a row of that new matrix (writable, and no
    other read shares its memory). A read of 64 packed vectors went from 285 to 220 µs.
    """
    one = _vector_decoder(dtype)

    def decode(blobs: _Column) -> list[Any]:
        out: list[Any] = [None] * len(blobs)
        by_length: dict[int, list[tuple[int, bytes]]] = {}
        for i, blob in enumerate(blobs):
            if blob is not None:
                by_length.setdefault(len(blob), []).append((i, blob))
        for length, group in by_length.items():
            start = _packed_start(group[0][1], dtype) if len(group) > 1 else None
            header = group[0][1][:start] if start is not None else b""
            if start is None or not all(blob.startswith(header) for _, blob in group):
                for i, blob in group:
                    out[i] = one(blob)
                continue
            payload = b"".join([blob[start:] for _, blob in group])
            matrix = np.frombuffer(payload, dtype=dtype).reshape(
                len(group), (length - start) // dtype.itemsize).copy()
            for (i, _), row in zip(group, matrix, strict=True):
                out[i] = row
        return out

    return decode


def _decoder(dtype: FeastType) -> Callable[[_Column], list[Any]]:
    if dtype == Array(Float32):
        return _vector_column_decoder(np.dtype("<f4"))
    if dtype == Array(Float64):
        return _vector_column_decoder(np.dtype("<f8"))
    # Only immutable values may be shared between results: lists are decoded every time.
    return _decode_cached() if dtype in (Int64, Float64, String) else _each(_decode)


_STRING_KEY_TAG = struct.pack("<I", ValueType.STRING.value)
_KEY_CACHE_LIMIT = 100_000
"""Encoded keys remembered per view (~20 MB at most): a catalog's items fit."""


def _entity_key_encoder(join_key: str) -> Callable[[str], bytes]:
    """``serialize_entity_key`` (v3) of a one-column string key, without building protos.

    v3 is the join-key prefix (from Feast's own ``serialize_entity_key_prefix``), then the
    value's type, byte length and UTF-8 bytes.
    """
    prefix = serialize_entity_key_prefix([join_key], entity_key_serialization_version=3)
    # Serving encodes the same candidates' keys request after request.
    memo: dict[str, bytes] = {}

    def encode(value: str) -> bytes:
        key = memo.get(value)
        if key is None:
            raw = value.encode()
            key = b"".join((prefix, _STRING_KEY_TAG, struct.pack("<I", len(raw)), raw))
            if len(memo) >= _KEY_CACHE_LIMIT:
                memo.clear()
            memo[value] = key
        return key

    return encode


def _row_time_us(row: Mapping[str, Any]) -> int:
    ts: datetime = row[TIMESTAMP_FIELD]
    # Feast reads a naive timestamp as UTC; so does streamrec.
    return epoch_us(ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class _View:
    """A feature view and how its values are stored: key, names, encoders, decoders."""

    view: FeatureView
    join_key: str
    names: tuple[str, ...]
    encoders: tuple[Callable[[Any], _Encoded], ...]
    decoders: dict[str, Callable[[_Column], list[Any]]]
    entity_key: Callable[[str], bytes]

    @classmethod
    def of(cls, view: FeatureView) -> _View:
        if len(view.entity_columns) != 1 or view.entity_columns[0].dtype != String:
            raise ValueError(f"{view.name}: streamrec stores views keyed by one string column")
        join_key = view.entity_columns[0].name
        return cls(
            view=view,
            join_key=join_key,
            names=tuple(f.name for f in view.features),
            encoders=tuple(_lookup(_ENCODERS, f.dtype)() for f in view.features),
            decoders={f.name: _decoder(f.dtype) for f in view.features},
            entity_key=_entity_key_encoder(join_key),
        )

    def newest_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[bytes, int, Mapping]]:
        """Per entity: its stored key and the last of its rows with the newest timestamp."""
        newest: dict[str, tuple[int, Mapping[str, Any]]] = {}
        join_key = self.join_key
        for row in rows:
            key, ts = row[join_key], _row_time_us(row)
            seen = newest.get(key)
            if seen is None or ts >= seen[0]:
                newest[key] = (ts, row)
        encode = self.entity_key
        return [(encode(key), ts, row) for key, (ts, row) in newest.items()]


_Request = tuple[_View, Sequence[str]]
"""A view and the features to fetch from it."""


# --- online store backends --------------------------------------------------------------


class _Sqlite:
    """The table of Feast's SQLite online store: one row per (entity key, feature).

    With ``remember``, :meth:`write` keeps the keys of the entities it has written (so all
    their feature rows exist) and updates those in place rather than upserting.
    """

    _MAX_KEYS = 10_000
    """Keys per SELECT, below SQLite's limit of bound variables."""
    _MAX_SELECTS = 4096
    """Read statements kept (one per view, features and number of keys)."""
    _MMAP_BYTES = 1 << 30
    _WRITE_CACHE_KIB = 256 * 1024
    """Page cache of a writing connection: updates scattered over a large table otherwise
    re-read the same B-tree pages from the OS on every write."""

    def __init__(self, config: RepoConfig, *, remember: bool = False) -> None:
        online = config.online_store
        if getattr(online, "vector_enabled", False) or getattr(
            online, "enable_openai_compatible_store", False
        ):
            raise ValueError("streamrec does not fill SQLite's vector or value_num columns")
        self._config = config
        self._path = online.path
        self._local = threading.local()
        self._tables: dict[str, str] = {}
        self._remember = remember
        self._sql: dict[str, tuple[str, str]] = {}
        self._known: dict[str, set[bytes]] = {}
        self._selects: dict[tuple[str, tuple[str, ...], int, int], str] = {}

    def _conn(self) -> sqlite3.Connection:
        # One connection per thread: the API serves requests from a thread pool.
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(self._path, timeout=30.0)
            conn.execute("PRAGMA synchronous=NORMAL")
            # Memory-mapped reads share the OS page cache between connections, rather than
            # each thread's connection filling its own page cache.
            conn.execute(f"PRAGMA mmap_size={self._MMAP_BYTES}")
        return conn

    def _table(self, view: FeatureView) -> str:
        table = self._tables.get(view.name)
        if table is None:
            name = _table_id(
                self._config.project,
                view,
                self._config.registry.enable_online_feature_view_versioning,
            )
            table = self._tables[view.name] = '"' + name.replace('"', '""') + '"'
        return table

    def _statements(self, plan: _View) -> tuple[str, str]:
        """The view's per-entity upsert and update statements.

        Both handle one entity per execution and name each feature once, as a literal:
        SQLite spends most of a row's cost per statement step and per bound value, so one
        statement per entity with the key and timestamp bound once (``?1``, ``?2``) writes
        a row about twice as fast as one statement per feature value.
        """
        statements = self._sql.get(plan.view.name)
        if statements is None:
            table = self._table(plan.view)
            names = [_sql_literal(n) for n in plan.names]
            # ?1 entity key, ?2 stored timestamp, then value and value_text per feature.
            values = ", ".join(
                f"(?1, {n}, ?{2 * i + 3}, ?{2 * i + 4}, ?2, NULL)" for i, n in enumerate(names)
            )
            upsert = (
                f"INSERT INTO {table} (entity_key, feature_name, value, value_text, event_ts,"
                f" created_ts) VALUES {values}"
                " ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value,"
                " value_text = excluded.value_text, event_ts = excluded.event_ts,"
                " created_ts = excluded.created_ts WHERE excluded.event_ts >= event_ts"
            )
            by_value = " ".join(f"WHEN {n} THEN ?{2 * i + 3}" for i, n in enumerate(names))
            by_text = " ".join(f"WHEN {n} THEN ?{2 * i + 4}" for i, n in enumerate(names))
            update = (
                f"UPDATE {table} SET value = CASE feature_name {by_value} END,"
                f" value_text = CASE feature_name {by_text} END, event_ts = ?2, created_ts = NULL"
                f" WHERE entity_key = ?1 AND feature_name IN ({', '.join(names)})"
                " AND event_ts <= ?2"
            )
            statements = self._sql[plan.view.name] = (upsert, update)
        return statements

    def write(self, plan: _View, rows: Sequence[Mapping[str, Any]]) -> None:
        upsert, update = self._statements(plan)
        encoders = plan.encoders
        names = plan.names
        known = self._known.setdefault(plan.view.name, set()) if self._remember else None
        updates: list[list[Any]] = []
        upserts: list[list[Any]] = []
        # Key order keeps the B-tree inserts local: about twice as fast as arrival order.
        for key, ts_us, row in sorted(plan.newest_rows(rows), key=itemgetter(0)):
            params: list[Any] = [key, _stored_seconds(ts_us // 1_000_000)]
            for name, encode in zip(names, encoders, strict=True):
                params += encode(row[name])
            (updates if known is not None and key in known else upserts).append(params)
        conn = self._conn()
        if not getattr(self._local, "writing", False):
            conn.execute(f"PRAGMA cache_size=-{self._WRITE_CACHE_KIB}")
            self._local.writing = True
        with conn:
            # Same effect, per feature row, as the upsert; cheaper where every row exists.
            conn.executemany(update, updates)
            conn.executemany(upsert, upserts)
        if known is not None:
            known.update(params[0] for params in upserts)

    def fetch(
        self, requests: Sequence[_Request], keys: Sequence[bytes]
    ) -> list[list[list[bytes | None]]]:
        """Per request, one column of stored values per feature, over ``keys``.

        One read transaction: the views are read as of one instant, and SQLite looks for
        changes (the WAL index, and whether its page cache is still valid) once, not once
        per view.
        """
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            return [self._fetch(conn, plan, features, keys) for plan, features in requests]
        finally:
            conn.execute("COMMIT")

    def _fetch(
        self, conn: sqlite3.Connection, plan: _View, features: Sequence[str],
        keys: Sequence[bytes],
    ) -> list[list[bytes | None]]:
        width = len(features)
        flat: list[bytes | None] = [None] * (len(keys) * width)
        for start in range(0, len(keys), self._MAX_KEYS):
            chunk = keys[start : start + self._MAX_KEYS]
            rows = conn.execute(self._select(plan, features, start, len(chunk)), chunk).fetchall()
            if rows:
                at, values = zip(*rows, strict=True)
                deque(map(flat.__setitem__, at, values), maxlen=0)
        return [flat[i::width] for i in range(width)]

    def _select(self, plan: _View, features: Sequence[str], start: int, n: int) -> str:
        """The SELECT of ``features`` for ``n`` keys from position ``start`` of a read.

        SQLite computes where each value goes (the key's position times the width plus the
        feature's), so Python only drops values into a flat list: the cost of a read of 200
        candidates x 13 features is then SQLite's, not a Python loop over 2,600 rows.
        """
        spec = (plan.view.name, tuple(features), start, n)
        sql = self._selects.get(spec)
        if sql is None:
            width = len(features)
            slot = " ".join(f"WHEN {_sql_literal(f)} THEN {i}" for i, f in enumerate(features))
            names = ", ".join(_sql_literal(f) for f in features)
            positions = ", ".join(f"({(start + i) * width}, ?)" for i in range(n))
            # "+": the feature filter must not use the (entity_key, feature_name) index,
            # which would cost a seek per feature; one seek per key reads all its rows.
            sql = (
                f"SELECT k.column1 + CASE t.feature_name {slot} END, t.value"
                f" FROM (VALUES {positions}) AS k JOIN {self._table(plan.view)} AS t"
                f" ON t.entity_key = k.column2 WHERE +t.feature_name IN ({names})"
            )
            if len(self._selects) >= self._MAX_SELECTS:
                self._selects.clear()
            self._selects[spec] = sql
        return sql

    def forget(self) -> None:
        """Drop what was derived from the views' schemas (after an ``apply``)."""
        self._sql.clear()
        self._known.clear()
        self._selects.clear()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            self._local.writing = False


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _naive_utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


@functools.lru_cache(maxsize=4096)
def _stored_seconds(seconds: int) -> int:
    """What Feast's datetime adapter stores for an event time: whole seconds of the naive UTC
    time (read as local time). Cached: ~2 µs per row otherwise, and a flush's rows share few
    distinct seconds when the stream is live."""
    return int(_naive_utc(seconds).timestamp())


class _Redis:
    """The hashes of Feast's Redis online store: one hash per entity, all its views in it.

    A write compares each entity's stored timestamp first. With ``remember``, :meth:`write`
    keeps the newest timestamp it knows each entity to hold, stored or read, and asks Redis
    only about entities it has not met yet: sound while no other process writes the same
    views (the backfill refuses to run beside the feature writer).
    """

    def __init__(self, store: FeatureStore, *, remember: bool = False) -> None:
        self._config = store.config
        # Feast's own client: the same connection options, cluster and sentinel support.
        self._client = store._get_provider().online_store._get_client(self._config.online_store)
        self._project = self._config.project.encode()
        self._fields: dict[str, tuple[bytes, dict[str, bytes]]] = {}
        self._remember = remember
        self._stored: dict[str, dict[bytes, int]] = {}

    def _hash_fields(self, view: FeatureView) -> tuple[bytes, dict[str, bytes]]:
        fields = self._fields.get(view.name)
        if fields is None:
            name = _versioned_fv_name(view, self._config)
            fields = self._fields[view.name] = (
                f"_ts:{name}".encode(),
                {f.name: _mmh3(f"{name}:{f.name}") for f in view.features},
            )
        return fields

    def write(self, plan: _View, rows: Sequence[Mapping[str, Any]]) -> None:
        ts_field, by_name = self._hash_fields(plan.view)
        fields = tuple(
            zip((by_name[n] for n in plan.names), plan.names, plan.encoders, strict=True)
        )
        newest = plan.newest_rows(rows)
        project = self._project
        known = self._stored.setdefault(plan.view.name, {}) if self._remember else {}
        stored: dict[bytes, int | None] = {}
        missing = [key for key, _, _ in newest if key not in known]
        if missing:
            with self._client.pipeline(transaction=False) as pipe:
                for key in missing:
                    pipe.hget(key + project, ts_field)
                replies = pipe.execute()
            previous = Timestamp()
            for key, old in zip(missing, replies, strict=True):
                if old is None:
                    stored[key] = None
                else:
                    previous.ParseFromString(old)
                    stored[key] = previous.seconds * 1_000_000 + previous.nanos // 1000
        newest_known: dict[bytes, int] = {}
        stamp = Timestamp()
        with self._client.pipeline(transaction=False) as pipe:
            for key, ts_us, row in newest:
                old = known[key] if key in known else stored[key]
                if old is not None and old > ts_us:
                    newest_known[key] = old
                    continue
                newest_known[key] = ts_us
                seconds, micros = divmod(ts_us, 1_000_000)
                stamp.seconds, stamp.nanos = seconds, micros * 1000
                command = ["HSET", key + project, ts_field, stamp.SerializeToString()]
                for field, name, encode in fields:
                    command += (field, encode(row[name])[0])
                pipe.execute_command(*command)
            pipe.execute()
        if self._remember:
            known.update(newest_known)

    def fetch(
        self, requests: Sequence[_Request], keys: Sequence[bytes]
    ) -> list[list[list[bytes | None]]]:
        """Per request, one column of stored values per feature, over ``keys``."""
        # An entity keeps every view in one hash: one HMGET per entity serves all views.
        fields: list[bytes] = []
        spans: list[tuple[int, Sequence[str]]] = []
        for plan, features in requests:
            ts_field, by_name = self._hash_fields(plan.view)
            spans.append((len(fields), features))
            fields.append(ts_field)
            fields.extend(by_name[f] for f in features)
        project = self._project
        with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key + project, fields)
            replies = pipe.execute()
        # Like Feast: without the view's timestamp field an entity has no row in that view.
        return [
            [
                [None if values[at] is None else values[at + 1 + i] for values in replies]
                for i in range(len(features))
            ]
            for at, features in spans
        ]

    def forget(self) -> None:
        """Drop what was derived from the views' schemas (after an ``apply``)."""
        self._fields.clear()
        self._stored.clear()

    def close(self) -> None:
        self._client.close()


def _backend(store: FeatureStore, *, remember: bool = False) -> _Sqlite | _Redis:
    kind = store.config.online_store.type
    if kind == "sqlite":
        return _Sqlite(store.config, remember=remember)
    if kind == "redis":
        return _Redis(store, remember=remember)
    raise ValueError(f"streamrec supports the sqlite and redis online stores, not {kind}")


class _Views:
    """Feature views read once from the registry, with their storage plans."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._plans: dict[str, _View] = {}

    def __getitem__(self, name: str) -> _View:
        plan = self._plans.get(name)
        if plan is None:
            view = self.store.get_feature_view(name, allow_registry_cache=True)
            plan = self._plans[name] = _View.of(view)
        return plan

    def clear(self) -> None:
        self.store.refresh_registry()
        self._plans.clear()


# --- public classes ----------------------------------------------------------------------


class OnlineFeatureWriter:
    """Writes feature rows to Feast's online store, and Parquet parts to the offline log.

    A row is a mapping with the view's join key, every feature of the view and
    ``event_timestamp`` (a UTC ``datetime``), like ``RealtimeFeatureEngine.user_row``.
    Views are read from the registry once; call :meth:`refresh` after an ``apply`` that
    changes a schema. Not for concurrent calls: one writer thread.

    Parameters
    ----------
    settings
        Home and online store choice.
    store
        A ``FeatureStore`` of these settings to share, instead of a new one.
    exclusive
        For a writer that rewrites the same entities again and again and is the only
        process writing them while it runs (the feature writer). It then remembers, per
        entity, what it already knows about the store (SQLite: that every feature row
        exists, so it updates in place; Redis: the stored event timestamp, so it need not
        read it first). Memory grows by a few dozen bytes per entity written; the effect
        of every write is the same as without it.

    Examples
    --------
    >>> import tempfile
    >>> from datetime import UTC, datetime
    >>> settings = Settings(home=tempfile.mkdtemp())
    >>> apply_repo(settings)  # doctest: +ELLIPSIS
    Created project streamrec...
    >>> row = {"item_id": "i7", "event_timestamp": datetime(2026, 3, 1, tzinfo=UTC),
    ...        "popularity_7d": 4, "unique_users_7d": 2, "ctr_7d": 0.1,
    ...        "popularity_30d": 9, "unique_users_30d": 5, "ctr_30d": 0.08}
    >>> with OnlineFeatureWriter(settings) as writer:
    ...     writer.write("item_stats", [row])
    ...     writer.append_offline("item_stats", [row], part="2026-03-01").name
    'part-2026-03-01.parquet'
    """

    def __init__(
        self, settings: Settings, *, store: FeatureStore | None = None, exclusive: bool = False
    ) -> None:
        self._views = _Views(store or feature_store(settings))
        self._backend = _backend(self._views.store, remember=exclusive)

    @property
    def store(self) -> FeatureStore:
        return self._views.store

    def refresh(self) -> None:
        """Forget the cached views; the next call reads the registry again."""
        self._views.clear()
        self._backend.forget()

    def write(self, view_name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert ``rows`` into the online store; an entity's stored newer row is kept.

        A view with a packed twin (``features.packed.PACKED``) gets its twin's rows too.
        """
        if rows:
            self._backend.write(self._views[view_name], rows)
            packed = PACKED.get(view_name)
            if packed is not None:
                self._backend.write(self._views[packed.name], [packed.pack(r) for r in rows])

    def offline_folder(self, view_name: str) -> Path:
        """The Parquet folder of the view: its push source's batch source, or its source."""
        view = self._views[view_name].view
        source = view.stream_source or view.batch_source
        if isinstance(source, PushSource):
            source = source.batch_source
        if not isinstance(source, FileSource):
            raise ValueError(f"{view_name} has no Parquet folder")
        return Path(FileSource.get_uri_for_file_path(self.store.config.repo_path, source.path))

    def append_offline(
        self, view_name: str, rows: Sequence[Mapping[str, Any]], *, part: str | None = None
    ) -> Path:
        """Write ``rows`` as one Parquet part file of the view's offline folder, atomically.

        ``part`` names the file ``part-<part>.parquet``: a caller that derives it from what it
        consumed (say, Kafka partition and offsets) makes a retry overwrite, not duplicate.
        By default the name is the UTC time plus a random suffix.
        """
        plan = self._views[view_name]
        schema = pa.schema(
            [
                pa.field(plan.join_key, pa.string()),
                pa.field(TIMESTAMP_FIELD, pa.timestamp("us", tz="UTC")),
                *(pa.field(f.name, _lookup(_ARROW_TYPES, f.dtype)) for f in plan.view.features),
            ]
        )
        table = pa.Table.from_pylist(list(rows), schema=schema)
        folder = self.offline_folder(view_name)
        folder.mkdir(parents=True, exist_ok=True)
        if part is None:
            part = f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
        target = folder / f"part-{part}.parquet"
        # Parquet readers skip dot-files, so a part being written is never read.
        temporary = folder / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as sink:
                pq.write_table(table, sink)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # makes the rename itself durable
        finally:
            os.close(directory)
        return target

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> OnlineFeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class _ReadPart:
    """The features of one view that a read returns, and their output column names."""

    view: str
    features: tuple[str, ...]
    columns: tuple[str, ...]


_ReadPlan = tuple[tuple[str, tuple[_ReadPart, ...]], ...]
"""Parts grouped by join key: the views of one entity share its keys (and Redis hash)."""


class OnlineFeatureReader:
    """Reads online features like ``get_online_features(...).to_dict()``, several times faster.

    ``features`` is a feature service name or a list of ``"view:feature"`` references;
    ``entity_rows`` holds the join key columns (or a list of row dicts). The result has the
    join key columns, then one list per feature, named ``<view>__<feature>`` with
    ``full_feature_names`` (which, as in Feast, names shared by two views require, e.g. in
    :data:`RANKER_SERVICE`) or else by the feature name: Python values as Feast returns them,
    except that ``Array(Float32)`` vectors come as float32 ``numpy`` arrays; ``None`` where
    an entity has no value. Each entity is fetched once per call however many rows repeat
    it, and those rows share its value objects (do not mutate them). Services and views are
    resolved once; call :meth:`refresh` after an ``apply``. Safe to share between threads.

    Parameters
    ----------
    settings
        Home and online store choice.
    store
        A ``FeatureStore`` of these settings to share, instead of a new one.

    Examples
    --------
    >>> import tempfile
    >>> settings = Settings(home=tempfile.mkdtemp())
    >>> apply_repo(settings)  # doctest: +ELLIPSIS
    Created project streamrec...
    >>> reader = OnlineFeatureReader(settings)
    >>> entities = {"user_id": ["u1", "u1"], "item_id": ["a", "b"]}
    >>> rows = reader.read(RANKER_SERVICE, entities, full_feature_names=True)
    >>> rows["item_id"], rows["user_realtime__views_5m"], rows["item_stats__ctr_7d"]
    (['a', 'b'], [None, None], [None, None])
    """

    def __init__(self, settings: Settings, *, store: FeatureStore | None = None) -> None:
        self._views = _Views(store or feature_store(settings))
        self._backend = _backend(self._views.store)
        self._plans: dict[tuple[str | tuple[str, ...], bool], _ReadPlan] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> FeatureStore:
        return self._views.store

    def refresh(self) -> None:
        """Forget resolved services and views; the next read resolves them again."""
        with self._lock:
            self._views.clear()
            self._plans.clear()

    def join_key(self, view: str) -> str:
        """The join key of ``view`` (e.g. ``item_id``)."""
        return self._views[view].join_key

    def _plan(self, features: str | Sequence[str], full_names: bool) -> _ReadPlan:
        spec = features if isinstance(features, str) else tuple(features)
        plan = self._plans.get((spec, full_names))
        if plan is None:
            with self._lock:
                plan = self._plans[(spec, full_names)] = self._resolve(spec, full_names)
        return plan

    def _resolve(self, spec: str | tuple[str, ...], full_names: bool) -> _ReadPlan:
        wanted: dict[tuple[str, str], list[str]] = {}
        if isinstance(spec, str):
            service = self.store.get_feature_service(spec, allow_cache=True)
            for projection in service.feature_view_projections:
                if projection.join_key_map:
                    raise ValueError(f"{spec}: join key mappings are not supported")
                wanted.setdefault((projection.name, projection.name_to_use()), []).extend(
                    f.name for f in projection.features
                )
        else:
            for ref in spec:
                view, _, feature = ref.partition(":")
                if not feature:
                    raise ValueError(f"feature reference {ref!r} is not 'view:feature'")
                wanted.setdefault((view, view), []).append(feature)
        groups: dict[str, list[_ReadPart]] = {}
        for (view, label), names in wanted.items():
            plan = self._views[view]
            unknown = sorted(set(names) - set(plan.names))
            if unknown:
                raise ValueError(f"{view} has no feature {', '.join(unknown)}")
            columns = tuple(f"{label}__{n}" if full_names else n for n in names)
            groups.setdefault(plan.join_key, []).append(_ReadPart(view, tuple(names), columns))
        outputs = [c for parts in groups.values() for part in parts for c in part.columns]
        clashes = sorted(
            {c for c in outputs if outputs.count(c) > 1} | (set(outputs) & set(groups))
        )
        if clashes:
            raise ValueError(
                f"features {', '.join(clashes)} come from several views (or are a join key): "
                "read with full_feature_names=True"
            )
        return tuple((key, tuple(parts)) for key, parts in groups.items())

    def read(
        self,
        features: str | Sequence[str],
        entity_rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
        *,
        full_feature_names: bool = False,
    ) -> dict[str, list[Any]]:
        """Features of every entity row, as columns (see the class docstring)."""
        columns = _entity_columns(entity_rows)
        out: dict[str, list[Any]] = {name: list(values) for name, values in columns.items()}
        for join_key, parts in self._plan(features, full_feature_names):
            keys = columns.get(join_key)
            if keys is None:
                raise ValueError(f"entity rows lack {join_key!r}, the key of {parts[0].view}")
            unique = list(dict.fromkeys(keys))
            views = [self._views[part.view] for part in parts]
            encode = views[0].entity_key
            fetched = self._backend.fetch(
                [(view, part.features) for view, part in zip(views, parts, strict=True)],
                [encode(key) for key in unique],
            )
            spread = None
            if len(unique) != len(keys):
                position = {key: i for i, key in enumerate(unique)}
                spread = itemgetter(*(position[key] for key in keys))
            for view, part, stored in zip(views, parts, fetched, strict=True):
                for feature, column, blobs in zip(part.features, part.columns, stored,
                                                  strict=True):
                    values = view.decoders[feature](blobs)
                    out[column] = values if spread is None else list(spread(values))
        return out

    def close(self) -> None:
        self._backend.close()


def _entity_columns(
    entity_rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
) -> dict[str, Sequence[Any]]:
    if isinstance(entity_rows, Mapping):
        columns = dict(entity_rows)
    elif entity_rows:
        columns = {key: [row[key] for row in entity_rows] for key in entity_rows[0]}
    else:
        columns = {}
    if len({len(values) for values in columns.values()}) > 1:
        raise ValueError("entity columns differ in length")
    return columns

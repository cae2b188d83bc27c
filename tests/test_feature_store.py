"""The Feast repo and streamrec's Feast read/write path, against real SQLite and Redis stores.

Each backend gets one home, applied once per module (importing Feast and applying cost
seconds). The Redis variant starts its own ``redis-server`` on a free port; it is skipped
only when the binary is absent.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from features.definitions import ITEM_VIEW, TIMESTAMP_FIELD, USER_VIEW
from features.realtime import RealtimeFeatureEngine
from features.store import (
    RANKER_SERVICE,
    OnlineFeatureReader,
    OnlineFeatureWriter,
    _decode,
    _entity_key_encoder,
    _float64,
    _vector_column_decoder,
    apply_repo,
    feature_store,
    registry_exists,
    repo_config,
)
from streamrec.contract import Event, Item
from streamrec.settings import Settings

T0 = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


@dataclass
class Backend:
    settings: Settings
    writer: OnlineFeatureWriter
    reader: OnlineFeatureReader
    exclusive: OnlineFeatureWriter  # remembers what it stored, like the feature writer's


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    home = tmp_path_factory.mktemp(f"home-{request.param}")
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        settings = Settings(home=home, online_store="redis", redis_url=url)
    else:
        settings = Settings(home=home)
    apply_repo(settings)
    writer, reader = OnlineFeatureWriter(settings), OnlineFeatureReader(settings)
    exclusive = OnlineFeatureWriter(settings, exclusive=True)
    yield Backend(settings, writer, reader, exclusive)
    writer.close()
    reader.close()
    exclusive.close()


def _event(user: str, minutes: float, kind: str = "view", **fields: Any) -> Event:
    return Event(
        event_id=str(uuid.uuid4()),
        event_type=kind,
        user_id=user,
        ts=T0 + timedelta(minutes=minutes),
        **fields,
    )


def _engine_rows(prefix: str) -> tuple[list[dict], list[dict]]:
    """User and item rows of a small real stream, entity ids prefixed to keep tests apart."""
    engine = RealtimeFeatureEngine()
    for n in range(4):
        engine.catalog_update(
            Item(
                item_id=f"{prefix}i{n}",
                title=f"thing {n}",
                category=f"cat{n % 2}",
                created_at=T0 - timedelta(days=9),
            )
        )
    result = engine.apply(
        [
            _event(f"{prefix}u1", 0, item_id=f"{prefix}i0", context={"device": "mobile"}),
            _event(f"{prefix}u1", 1, "click", item_id=f"{prefix}i1"),
            _event(f"{prefix}u1", 2, "impression", items=[f"{prefix}i2", f"{prefix}i3"]),
            _event(f"{prefix}u2", 3, "purchase", item_id=f"{prefix}i1", context={"country": "DE"}),
            # A user whose only event is an impression has no recent items: an empty list.
            _event(f"{prefix}u3", 4, "impression", items=[f"{prefix}i0"]),
        ]
    )
    users = [engine.user_row(u) for u in sorted(result.changed_users)]
    items = [engine.item_row(i) for i in sorted(result.changed_items)]
    return users, items


def _same_as_feast(ours: dict[str, list], feast: dict[str, list]) -> None:
    assert ours.keys() == feast.keys()
    for column, theirs in feast.items():
        for mine, value in zip(ours[column], theirs, strict=True):
            if isinstance(mine, np.ndarray):
                # Vectors come back as float32 arrays where Feast gives lists of floats.
                assert mine.dtype == np.float32 and mine.tolist() == value, column
            else:
                assert type(mine) is type(value) and mine == value, (column, mine, value)


# --- configuration and the repo --------------------------------------------------------------


def test_config_fills_the_home_and_selects_redis() -> None:
    config = repo_config(Settings(home=Path("/srv/rec")))
    assert config.project == "streamrec"
    assert config.registry.path == "/srv/rec/feast/registry.db"
    assert config.registry.cache_ttl_seconds > 0
    assert (config.online_store.type, config.online_store.path) == (
        "sqlite",
        "/srv/rec/feast/online.db",
    )
    assert config.offline_store.type == "file" and str(config.repo_path) == "/srv/rec"

    redis_settings = Settings(
        online_store="redis", redis_url="rediss://:s%40cret@cache.internal:6380/3"
    )
    assert repo_config(redis_settings).online_store.connection_string == (
        "cache.internal:6380,db=3,password=s@cret,ssl=true"
    )
    with pytest.raises(ValueError, match="redis://"):
        repo_config(Settings(online_store="redis", redis_url="cache:6379"))


def test_apply_registers_the_repo_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(home=tmp_path)
    assert not registry_exists(settings)
    apply_repo(settings)
    assert registry_exists(settings)
    assert "Created feature service ranker_features" in capsys.readouterr().out
    apply_repo(settings)
    assert "No changes to registry" in capsys.readouterr().out

    store = feature_store(settings)
    views = {v.name: v for v in store.list_feature_views()}
    assert set(views) == {
        "user_realtime",
        "item_realtime",
        "item_realtime_vector",
        "user_stats",
        "item_stats",
        "item_profile",
        "item_embeddings",
        "item_neighbors",
    }
    # The real-time schemas are generated from features.definitions, in order.
    for spec in (USER_VIEW, ITEM_VIEW):
        assert [f.name for f in views[spec.name].features] == list(spec.names)
    embeddings = {f.name: f.vector_length for f in views["item_embeddings"].features}
    assert embeddings == {"graph_vector": 64, "text_vector": 384}
    service = store.get_feature_service(RANKER_SERVICE)
    # Serving reads item_neighbors for candidates; the ranker does not score with it. The
    # packed twin of item_realtime is how serving reads that view, not another input.
    inputs = set(views) - {"item_neighbors", "item_realtime_vector"}
    assert {p.name for p in service.feature_view_projections} == inputs
    for name in views.keys() - {"item_realtime_vector"}:  # source folders, ready for parts
        assert (tmp_path / "offline" / name).is_dir()
    with sqlite3.connect(tmp_path / "feast" / "online.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_entity_key_bytes_are_feasts() -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    encode = _entity_key_encoder("user_id")
    for key in ["u1", "", "ünïcødé-👍", "x" * 300]:
        proto = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=key)])
        assert encode(key) == serialize_entity_key(proto, entity_key_serialization_version=3)


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_a_column_of_vectors_decodes_like_each_value_alone(dtype: str) -> None:
    from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    rng = np.random.default_rng(0)

    def stored(values: list[float]) -> bytes:
        if dtype == "<f4":
            return ValueProto(float_list_val=FloatList(val=values)).SerializeToString()
        return ValueProto(double_list_val=DoubleList(val=values)).SerializeToString()

    vectors = [rng.normal(size=n).tolist() for n in (13, 13, 5, 13, 1, 5, 0)]
    blobs: list[bytes | None] = [stored(v) for v in vectors]
    blobs[1:1] = [None, ValueProto().SerializeToString()]  # no row; a null value
    decoded = _vector_column_decoder(np.dtype(dtype))(blobs)
    assert len(decoded) == len(blobs)
    for blob, got in zip(blobs, decoded, strict=True):
        want = None if blob is None else _decode(blob)
        if want is None:
            assert got is None
        else:
            assert got.dtype == np.dtype(dtype)
            assert np.array_equal(got, np.asarray(want, dtype=dtype))
    got = decoded[0]
    got[0] = 42.0  # values are the caller's own: writable, and shared with nothing else
    assert decoded[3][0] != 42.0


# --- online round trips ------------------------------------------------------------------------


def test_written_rows_read_back_through_reader_and_feast(backend: Backend) -> None:
    users, items = _engine_rows("rt-")
    rng = np.random.default_rng(7)
    vectors = {
        row["item_id"]: (rng.random(64, dtype=np.float32), rng.random(384, dtype=np.float32))
        for row in items
    }
    backend.writer.write(USER_VIEW.name, users)
    backend.writer.write(ITEM_VIEW.name, items)
    backend.writer.write(
        "user_stats",
        [
            {
                "user_id": "rt-u1",
                TIMESTAMP_FIELD: T0,
                **{f"views_{w}": 3 for w in ("7d", "30d")},
                **{
                    f"{t}_{w}": 1
                    for t in ("clicks", "add_to_carts", "purchases", "impressions")
                    for w in ("7d", "30d")
                },
                "purchase_rate_30d": 1 / 3,
                "category_affinity": '{"cat0": 0.5, "cat1": 0.5}',
                "avg_price_30d": 12.5,
            }
        ],
    )
    backend.writer.write(
        "item_stats",
        [
            {
                "item_id": "rt-i1",
                TIMESTAMP_FIELD: T0,
                "popularity_7d": 2,
                "unique_users_7d": 2,
                "ctr_7d": 0.1,
                "popularity_30d": 5,
                "unique_users_30d": 4,
                "ctr_30d": 0.09,
            }
        ],
    )
    backend.writer.write(
        "item_embeddings",
        [
            {"item_id": item, TIMESTAMP_FIELD: T0, "graph_vector": graph, "text_vector": text}
            for item, (graph, text) in vectors.items()
        ],
    )

    candidates = ["rt-i0", "rt-i1", "rt-i2", "rt-i3", "rt-never"]
    entity_rows = {"user_id": ["rt-u1"] * len(candidates), "item_id": candidates}
    with pytest.raises(ValueError, match="full_feature_names=True"):
        backend.reader.read(RANKER_SERVICE, entity_rows)  # views_1h is user's and item's
    ours = backend.reader.read(RANKER_SERVICE, entity_rows, full_feature_names=True)
    store = backend.reader.store
    feast = store.get_online_features(
        store.get_feature_service(RANKER_SERVICE), entity_rows, full_feature_names=True
    ).to_dict()
    _same_as_feast(ours, feast)

    # ... and both are the engine's values.
    user = next(row for row in users if row["user_id"] == "rt-u1")
    for name in USER_VIEW.names:
        assert ours[f"user_realtime__{name}"] == [user[name]] * len(candidates)
    for row in items:
        at = candidates.index(row["item_id"])
        assert {n: ours[f"item_realtime__{n}"][at] for n in ITEM_VIEW.names} == {
            n: row[n] for n in ITEM_VIEW.names
        }
        graph, text = vectors[row["item_id"]]
        assert np.array_equal(ours["item_embeddings__graph_vector"][at], graph)
        assert np.array_equal(ours["item_embeddings__text_vector"][at], text)
    assert ours["item_stats__ctr_7d"] == [None, 0.1, None, None, None]
    assert ours["user_stats__category_affinity"][0] == '{"cat0": 0.5, "cat1": 0.5}'
    assert all(ours[f"item_realtime__{n}"][-1] is None for n in ITEM_VIEW.names)

    # A user with nothing but an impression has an empty, not a missing, list.
    empty = backend.reader.read(["user_realtime:recent_items"], [{"user_id": "rt-u3"}])
    assert empty == {"user_id": ["rt-u3"], "recent_items": [[]]}


def test_storage_is_what_feast_push_stores(backend: Backend) -> None:
    """Same rows, once through FeatureStore.push and once through the writer: same bytes."""
    from feast.data_source import PushMode

    users, _ = _engine_rows("pp-")
    pushed = [{**row, "user_id": "push-" + row["user_id"]} for row in users]
    written = [{**row, "user_id": "fast-" + row["user_id"]} for row in users]
    store = feature_store(backend.settings)
    store.push("user_realtime_push", pd.DataFrame(pushed), to=PushMode.ONLINE)
    backend.writer.write(USER_VIEW.name, written)

    encode = _entity_key_encoder("user_id")
    for push_row, fast_row in zip(pushed, written, strict=True):
        a, b = encode(push_row["user_id"]), encode(fast_row["user_id"])
        if backend.settings.online_store == "sqlite":
            with sqlite3.connect(store.config.online_store.path) as conn:
                sql = (
                    "SELECT feature_name, value, value_text, event_ts FROM "
                    "streamrec_user_realtime WHERE entity_key = ? ORDER BY feature_name"
                )
                assert conn.execute(sql, (a,)).fetchall() == conn.execute(sql, (b,)).fetchall()
        else:
            client = redis.Redis.from_url(backend.settings.redis_url)
            assert client.hgetall(a + b"streamrec") == client.hgetall(b + b"streamrec")
            client.close()


@pytest.mark.parametrize("exclusive", [False, True], ids=["plain", "exclusive"])
def test_newer_or_equal_event_time_wins(backend: Backend, exclusive: bool) -> None:
    user = f"ts-user-{exclusive}"
    template = {**_engine_rows("ts-")[0][0], "user_id": user}
    writer = backend.exclusive if exclusive else backend.writer

    def row(minutes: float, views: int, key: str = user) -> dict:
        return {
            **template,
            "user_id": key,
            TIMESTAMP_FIELD: T0 + timedelta(minutes=minutes),
            "views_5m": views,
        }

    def views(key: str = user) -> int:
        return backend.reader.read(["user_realtime:views_5m"], {"user_id": [key]})["views_5m"][0]

    writer.write(USER_VIEW.name, [row(10, 5)])
    writer.write(USER_VIEW.name, [row(9, 9)])  # older: ignored
    assert views() == 5
    writer.write(USER_VIEW.name, [row(10, 7)])  # equal: a late event, applied
    assert views() == 7
    # Within one batch too: the newest row wins, then the last of equals.
    writer.write(USER_VIEW.name, [row(20, 1), row(15, 2), row(20, 3)])
    assert views() == 3
    writer.write(USER_VIEW.name, [row(30, 4)])  # newer again, over a row this writer stored
    assert views() == 4

    # A row stored by someone else (a writer before a restart) is respected the same way.
    other = f"{user}-other"
    backend.writer.write(USER_VIEW.name, [row(40, 8, other)])
    writer.write(USER_VIEW.name, [row(35, 1, other), row(38, 2, user)])
    assert (views(other), views()) == (8, 2)
    writer.write(USER_VIEW.name, [row(39, 3, other)])
    assert views(other) == 8
    writer.write(USER_VIEW.name, [row(40, 6, other)])
    assert views(other) == 6


def test_rows_written_again_are_still_what_feast_push_stores(backend: Backend) -> None:
    """The exclusive writer updates known entities in place: the bytes stay Feast's."""
    from feast.data_source import PushMode

    users, _ = _engine_rows("again-")
    pushed = [{**row, "user_id": "push-" + row["user_id"]} for row in users]
    final = [{**row, "user_id": "fast-" + row["user_id"]} for row in users]
    first = [
        {**row, TIMESTAMP_FIELD: row[TIMESTAMP_FIELD] - timedelta(minutes=1), "views_5m": 99,
         "last_device": "other", "recent_items": ["x"], "session_duration_s": 0.5}
        for row in final
    ]
    feature_store(backend.settings).push(
        "user_realtime_push", pd.DataFrame(pushed), to=PushMode.ONLINE
    )
    backend.exclusive.write(USER_VIEW.name, first)
    backend.exclusive.write(USER_VIEW.name, final)  # every entity known now: the update path

    encode = _entity_key_encoder("user_id")
    for push_row, fast_row in zip(pushed, final, strict=True):
        a, b = encode(push_row["user_id"]), encode(fast_row["user_id"])
        assert _stored(backend, a) == _stored(backend, b)


def _stored(backend: Backend, key: bytes) -> Any:
    if backend.settings.online_store == "sqlite":
        path = repo_config(backend.settings).online_store.path
        with sqlite3.connect(path) as conn:
            return conn.execute(
                "SELECT feature_name, value, value_text, event_ts, created_ts FROM "
                "streamrec_user_realtime WHERE entity_key = ? ORDER BY feature_name",
                (key,),
            ).fetchall()
    client = redis.Redis.from_url(backend.settings.redis_url)
    try:
        return client.hgetall(key + b"streamrec")
    finally:
        client.close()


@pytest.mark.parametrize(
    "value", [0.0, -0.0, 1.5, 0.1, 1e-310, 1.7976931348623157e308, float("inf"), float("nan"), 3]
)
def test_float_values_are_encoded_like_feast(value: float) -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    blob, text = _float64(value)
    assert blob == Value(double_val=value).SerializeToString()
    assert text == str(float(value))


def test_reader_accepts_row_dicts_and_rejects_unknown_features(backend: Backend) -> None:
    users, _ = _engine_rows("rd-")
    backend.writer.write(USER_VIEW.name, users)
    columns = backend.reader.read(["user_realtime:views_5m"], {"user_id": ["rd-u1", "rd-u2"]})
    rows = backend.reader.read(
        ["user_realtime:views_5m"], [{"user_id": "rd-u1"}, {"user_id": "rd-u2"}]
    )
    assert rows == columns == {"user_id": ["rd-u1", "rd-u2"], "views_5m": [1, 0]}
    full = backend.reader.read(
        ["user_realtime:views_5m"], {"user_id": ["rd-u1"]}, full_feature_names=True
    )
    assert full == {"user_id": ["rd-u1"], "user_realtime__views_5m": [1]}
    with pytest.raises(ValueError, match="no feature"):
        backend.reader.read(["user_realtime:nope"], {"user_id": ["rd-u1"]})


# --- offline --------------------------------------------------------------------------------------


def test_offline_log_feeds_point_in_time_joins(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    apply_repo(settings)
    template = _engine_rows("pit-")[0][0]
    writer = OnlineFeatureWriter(settings)

    def row(user: str, minutes: int, views: int, device: str) -> dict:
        return {
            **template,
            "user_id": user,
            TIMESTAMP_FIELD: T0 + timedelta(minutes=minutes),
            "views_5m": views,
            "last_device": device,
            "recent_items": [f"i{views}"],
        }

    first = writer.append_offline(
        USER_VIEW.name, [row("a", 0, 1, "mobile"), row("b", 0, 10, "tablet")], part="p0-0-1"
    )
    writer.append_offline(USER_VIEW.name, [row("a", 30, 2, "desktop")])
    # Retrying with the same part name replaces the file instead of adding a duplicate.
    again = writer.append_offline(
        USER_VIEW.name, [row("a", 0, 1, "mobile"), row("b", 0, 10, "tablet")], part="p0-0-1"
    )
    folder = tmp_path / "offline" / USER_VIEW.name
    assert first == again and first.parent == folder
    parts = sorted(p.name for p in folder.iterdir())
    assert len(parts) == 2 and "part-p0-0-1.parquet" in parts  # no temporary files left

    labels = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "c"],
            TIMESTAMP_FIELD: [
                T0 - timedelta(hours=1),
                T0 + timedelta(minutes=5),
                T0 + timedelta(minutes=45),
                T0 + timedelta(minutes=45),
                T0,
            ],
        }
    )
    joined = (
        feature_store(settings)
        .get_historical_features(
            labels,
            ["user_realtime:views_5m", "user_realtime:last_device", "user_realtime:recent_items"],
        )
        .to_df()
    )
    # The file offline store may drop label rows without any feature row inside the TTL:
    # merge back onto the labels, as training does.
    result = labels.merge(joined, on=["user_id", TIMESTAMP_FIELD], how="left")
    assert result["views_5m"].tolist()[1:4] == [1, 2, 10]
    assert result["last_device"].tolist()[1:4] == ["mobile", "desktop", "tablet"]
    assert [list(v) for v in result["recent_items"].tolist()[1:4]] == [["i1"], ["i2"], ["i10"]]
    assert pd.isna(result["views_5m"].iloc[0]) and pd.isna(result["views_5m"].iloc[4])
    writer.close()


def test_batch_view_materializes_from_its_folder(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    apply_repo(settings)
    writer = OnlineFeatureWriter(settings)
    stats = {
        "popularity_7d": 2,
        "unique_users_7d": 2,
        "ctr_7d": 0.1,
        "popularity_30d": 5,
        "unique_users_30d": 4,
        "ctr_30d": 0.09,
    }
    writer.append_offline(
        "item_stats",
        [
            {"item_id": "i1", TIMESTAMP_FIELD: T0 - timedelta(days=1), **stats, "ctr_7d": 0.5},
            {"item_id": "i1", TIMESTAMP_FIELD: T0, **stats},
        ],
    )
    store = feature_store(settings)
    store.materialize(T0 - timedelta(days=2), T0 + timedelta(hours=1), ["item_stats"])
    read = OnlineFeatureReader(settings, store=store).read(
        ["item_stats:ctr_7d", "item_stats:popularity_30d"], {"item_id": ["i1"]}
    )
    assert read == {
        "item_id": ["i1"],
        "ctr_7d": [0.1],
        "popularity_30d": [5],
    }
    writer.close()

"""The shared model input: the same features online and offline, stale windows read as 0."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from training.ranking_batch import NUMERIC_FEATURES, RankingBatch, numeric_matrix, numeric_rows


def _column(batch: RankingBatch, name: str) -> np.ndarray:
    return numeric_matrix(batch)[:, NUMERIC_FEATURES.index(name)]


def _features(last_event_ts: float) -> dict[str, list]:
    return {
        "user_realtime__views_5m": [4, 4],
        "user_realtime__views_1h": [4, 4],
        "user_realtime__views_24h": [9, 9],
        "user_realtime__last_event_ts": [last_event_ts] * 2,
        "user_realtime__recent_items": [["b", "x"], ["b", "x"]],
        "user_stats__category_affinity": [json.dumps({"Shoes": 0.75, "Books": 0.25})] * 2,
        "item_profile__category": ["Shoes", None],
        "item_profile__created_at_s": [0.0, None],
    }


def test_a_count_whose_window_has_passed_since_the_last_event_reads_as_zero() -> None:
    now = 100_000.0
    fresh = RankingBatch.for_request("u", ["a", "b"], _features(now - 60), ts_s=now)
    idle = RankingBatch.for_request("u", ["a", "b"], _features(now - 2 * 3600), ts_s=now)
    assert _column(fresh, "user_views_5m")[0] == pytest.approx(math.log1p(4))
    assert _column(idle, "user_views_5m")[0] == 0.0
    assert _column(idle, "user_views_1h")[0] == 0.0
    assert _column(idle, "user_views_24h")[0] == pytest.approx(math.log1p(9))


def test_pair_features_come_from_the_users_and_the_candidates_rows() -> None:
    batch = RankingBatch.for_request("u", ["a", "b"], _features(0.0), ts_s=86_400.0)
    assert list(_column(batch, "category_affinity")) == [0.75, 0.0]  # unknown category → 0
    assert list(_column(batch, "recently_interacted")) == [0.0, 1.0]
    assert _column(batch, "item_age_days")[0] == pytest.approx(math.log1p(1.0))


def test_a_point_in_time_frame_gives_the_values_of_an_online_read() -> None:
    online = RankingBatch.for_request("u", ["a", "b"], _features(500.0), ts_s=1_000.0,
                                      device="mobile", country="de")
    frame = pd.DataFrame({
        "user_id": ["u", "u"],
        "item_id": ["a", "b"],
        "event_timestamp": pd.to_datetime([1_000, 1_000], unit="s", utc=True),
        "device": ["mobile", "mobile"],
        "country": ["DE", "DE"],
        # What a point-in-time join returns: NaN for a missing number.
        **{k: [np.nan if v is None else v for v in vs] for k, vs in _features(500.0).items()},
    })
    offline = RankingBatch.from_frame(frame)
    np.testing.assert_array_equal(numeric_matrix(offline), numeric_matrix(online))
    assert numeric_rows(offline) == numeric_rows(online)


def test_a_cold_user_and_an_unknown_item_are_ordinary_all_zero_rows() -> None:
    batch = RankingBatch.for_request("new", ["never-seen"], {}, ts_s=0.0)
    x = numeric_matrix(batch)
    assert x.shape == (1, len(NUMERIC_FEATURES))
    assert np.isfinite(x).all()


def test_take_and_length_checks() -> None:
    batch = RankingBatch.for_request("u", ["a", "b"], _features(0.0), ts_s=10.0)
    picked = batch.take([1])
    assert list(picked.item_ids) == ["b"] and picked.column("item_profile__category") == [None]
    with pytest.raises(ValueError, match="rows"):
        RankingBatch.for_request("u", ["a"], {"user_realtime__views_5m": [1, 2]}, ts_s=0.0)


def test_a_requests_user_features_given_once_equal_them_repeated_on_every_row() -> None:
    items = ["a", "b", "c"]
    repeated = {k: v + v[:1] for k, v in _features(900.0).items()}
    user = {k: v[0] for k, v in repeated.items() if k.startswith("user_")}
    candidates = {k: v for k, v in repeated.items() if not k.startswith("user_")}
    given = RankingBatch.for_request("u", items, candidates, ts_s=1_000.0, device="mobile",
                                     user=user)
    plain = RankingBatch.for_request("u", items, repeated, ts_s=1_000.0, device="mobile")
    assert given.features.keys() == plain.features.keys()
    np.testing.assert_array_equal(numeric_matrix(given), numeric_matrix(plain))
    assert numeric_rows(given) == numeric_rows(plain)
    # A user column the given values lack: the rows are confirmed as before.
    partial = RankingBatch.for_request("u", items, repeated, ts_s=1_000.0, device="mobile",
                                       user={"user_realtime__views_5m": 4})
    np.testing.assert_array_equal(numeric_matrix(partial), numeric_matrix(plain))

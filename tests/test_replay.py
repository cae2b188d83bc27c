"""Dataset replay: MovieLens 100K / latest and REES46 e-commerce, on tiny handwritten files."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streaming.replay import (
    ReplayError,
    detect_format,
    replay_ecommerce,
    replay_movielens,
)
from streamrec.contract import Event, EventType, Item, parse_event, parse_item


def _flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


# user, item, rating, timestamp: out of time order, with a tie (lines 2 and 4 at 880000100).
U_DATA = """\
196\t242\t3\t881250949
186\t302\t3\t880000100
22\t377\t1\t878887116
244\t51\t2\t880000100
166\t346\t1\t886397596
"""
U_ITEM = (
    f"242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|{_flags(5)}\n"
    f"302|L.A. Confidential (1997)|01-Jan-1997||http://x|{_flags(6, 10, 13, 16)}\n"
    f"377|Heavyweights (1994)|01-Jan-1994||http://x|{_flags(4, 5)}\n"
    f"51|Legends of the Fall (1994)|01-Jan-1994||http://x|{_flags(8, 14, 17, 18)}\n"
    f"346|Jackie Brown (1997)|01-Jan-1999||http://x|{_flags(6, 8)}\n"
    f"267|unknown|||http://x|{_flags(0)}\n"
)
U_USER = "196|49|M|writer|55105\n186|39|F|executive|00000\n22|25|M|writer|40206\n"


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text(U_DATA)
    (folder / "u.item").write_bytes(U_ITEM.replace("Kolya", "Kolyá").encode("latin-1"))
    (folder / "u.user").write_text(U_USER)
    return folder


@pytest.fixture
def ml_latest(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-latest-tiny"
    folder.mkdir()
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "40697,Babylon 5,Sci-Fi\n"
        "114335,La cravate (1957),(no genres listed)\n"
    )
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n"
        "1,11,4.5,964981247\n"
        "2,40697,0.5,1445714994\n"
        "2,1,3.0,964981247\n"
    )
    return folder


NOTEBOOK = ("1307067", "2053013558920217191", "computers.notebook", "lenovo")
ECOMMERCE = "".join(",".join(row) + "\n" for row in [
    ("event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price",
     "user_id", "user_session"),
    ("2019-10-01 00:00:00 UTC", "view", "44600062", "2103807459595387724", "", "shiseido",
     "35.79", "541312140", "72d76fde"),
    ("2019-10-01 00:00:01 UTC", "view", *NOTEBOOK, "251.74", "550050854", "7c90fc70"),
    ("2019-10-01 00:00:01 UTC", "cart", *NOTEBOOK, "249.99", "550050854", "7c90fc70"),
    ("2019-10-01 00:00:02 UTC", "remove_from_cart", *NOTEBOOK, "249.99", "550050854",
     "7c90fc70"),
    ("2019-10-01 00:00:05 UTC", "purchase", *NOTEBOOK, "249.99", "550050854", "7c90fc70"),
    ("2019-10-01 00:00:07 UTC", "view", "17200506", "2053013559792632471",
     "furniture.living_room.sofa", "", "543.10", "519107250", ""),
])


@pytest.fixture
def ecommerce(tmp_path: Path) -> Path:
    folder = tmp_path / "rees46-tiny"
    folder.mkdir()
    path = folder / "events.csv"
    path.write_text(ECOMMERCE)
    return path


def _events(records: list[Event | Item]) -> list[Event]:
    return [r for r in records if isinstance(r, Event)]


def _assert_valid(records: list[Event | Item]) -> None:
    for r in records:
        if isinstance(r, Event):
            assert parse_event(r.to_json()) == r
        else:
            assert parse_item(r.to_json()) == r


def test_detect_format(ml100k: Path, ml_latest: Path, ecommerce: Path, tmp_path: Path) -> None:
    assert detect_format(ml100k) == "movielens-100k"
    assert detect_format(ml100k / "u.data") == "movielens-100k"
    assert detect_format(ml_latest) == "movielens-latest"
    assert detect_format(ml_latest / "ratings.csv") == "movielens-latest"
    assert detect_format(ecommerce) == "ecommerce"
    with pytest.raises(ReplayError, match="no MovieLens files"):
        detect_format(tmp_path)
    with pytest.raises(ReplayError, match="no such file"):
        detect_format(tmp_path / "missing")
    with pytest.raises(ReplayError, match="use replay_ecommerce"):
        replay_movielens(ecommerce)


def test_movielens_100k(ml100k: Path) -> None:
    source = replay_movielens(ml100k)
    assert source.format == "movielens-100k"
    records = list(source)
    _assert_valid(records)
    n_items = U_ITEM.count("\n")
    assert all(isinstance(r, Item) for r in records[:n_items])  # catalog first
    events = _events(records)
    assert len(events) == U_DATA.count("\n")  # one event per rating
    # Time order; the tie at 880000100 keeps file order (line 2 before line 4).
    assert [(e.user_id, e.item_id) for e in events] == [
        ("22", "377"), ("186", "302"), ("244", "51"), ("196", "242"), ("166", "346")]
    assert all(e.event_type is EventType.VIEW for e in events)
    assert [e.context.model_extra["rating"] for e in events if e.context] == [
        "1", "3", "2", "3", "1"]
    assert events[0].ts == datetime.fromtimestamp(878887116, UTC)

    items = {i.item_id: i for i in records[:n_items]}
    kolya = items["242"]
    assert kolya.title == "Kolyá (1996)" and kolya.category == "Comedy"
    assert kolya.attributes["year"] == "1997"
    assert kolya.attributes["release_date"] == "1997-01-24"
    assert items["302"].category == "Crime"
    assert items["302"].attributes["genres"] == "Crime|Film-Noir|Mystery|Thriller"
    assert items["377"].category == "Children's"
    assert items["267"].category == "unknown" and "year" not in items["267"].attributes
    # Released before its first rating: the release date; rated "before release": the rating.
    assert kolya.created_at == datetime(1997, 1, 24, tzinfo=UTC)
    assert items["346"].created_at == datetime.fromtimestamp(886397596, UTC)
    # Never rated and undated: the dataset's first moment.
    assert items["267"].created_at == datetime.fromtimestamp(878887116, UTC)


def test_movielens_100k_genre_names_from_u_genre(ml100k: Path) -> None:
    names = ["none", *[f"G{i}" for i in range(1, 19)]]
    (ml100k / "u.genre").write_text("".join(f"{n}|{i}\n" for i, n in enumerate(names)))
    items = {i.item_id: i for i in replay_movielens(ml100k).items()}
    assert items["242"].category == "G5"


def test_movielens_latest(ml_latest: Path) -> None:
    source = replay_movielens(ml_latest)
    assert source.format == "movielens-latest"
    records = list(source)
    _assert_valid(records)
    items = [r for r in records if isinstance(r, Item)]
    events = _events(records)
    assert [i.item_id for i in items] == ["1", "11", "40697", "114335"]
    assert records[: len(items)] == items
    assert items[1].title == "American President, The (1995)"
    assert items[1].category == "Comedy"
    assert items[1].attributes == {"genres": "Comedy|Drama|Romance", "year": "1995"}
    assert items[2].attributes == {"genres": "Sci-Fi"}  # no year in the title
    assert items[2].created_at == datetime.fromtimestamp(1445714994, UTC)  # its first rating
    assert items[3].category == "(no genres listed)"
    assert items[0].created_at == datetime(1995, 1, 1, tzinfo=UTC)
    # Ties (964981247 twice) in file order.
    assert [(e.user_id, e.item_id, e.context.model_extra["rating"])
            for e in events if e.context] == [
        ("1", "11", "4.5"), ("2", "1", "3"), ("1", "1", "4"), ("2", "40697", "0.5")]


def test_replay_ids_are_stable_and_unique(ml100k: Path, tmp_path: Path) -> None:
    first = [e.event_id for e in replay_movielens(ml100k).events()]
    again = [e.event_id for e in replay_movielens(ml100k).events()]
    assert first == again and len(set(first)) == len(first)
    # The same files elsewhere under the same folder name: the same ids.
    copy = tmp_path / "elsewhere" / "ml-100k"
    shutil.copytree(ml100k, copy)
    assert [e.event_id for e in replay_movielens(copy).events()] == first
    # A different dataset name: different ids.
    renamed = [e.event_id for e in replay_movielens(ml100k, dataset="other").events()]
    assert set(renamed).isdisjoint(first)


def test_ecommerce(ecommerce: Path) -> None:
    source = replay_ecommerce(ecommerce)
    records = list(source)
    _assert_valid(records)
    items = [r for r in records if isinstance(r, Item)]
    events = _events(records)
    assert records[: len(items)] == items
    assert [i.item_id for i in items] == ["44600062", "1307067", "17200506"]
    shiseido, lenovo, sofa = items
    assert (shiseido.title, shiseido.category) == ("Shiseido product", "2103807459595387724")
    assert (lenovo.title, lenovo.category, lenovo.price) == (
        "Lenovo notebook", "computers.notebook", 251.74)
    assert lenovo.attributes == {"brand": "lenovo", "category_code": "computers.notebook",
                                 "category_id": "2053013558920217191"}
    assert sofa.title == "Sofa"
    assert lenovo.created_at == datetime(2019, 10, 1, 0, 0, 1, tzinfo=UTC)
    # remove_from_cart has no v1 event: skipped; cart becomes add_to_cart.
    assert [e.event_type.value for e in events] == [
        "view", "view", "add_to_cart", "purchase", "view"]
    assert events[1].session_id == "7c90fc70" and events[-1].session_id is None
    assert events[0].user_id == "541312140" and events[0].item_id == "44600062"
    assert [e.event_id for e in replay_ecommerce(ecommerce).events()] == [
        e.event_id for e in events]
    assert len({e.event_id for e in events}) == len(events)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("186\t302\t3\n", "expected 4 tab-separated fields"),
        ("186\tabc\t3\t880000100\n", "item id must be an integer"),
        ("186\t302\tgood\t880000100\n", "rating must be a number"),
    ],
)
def test_movielens_malformed_rating_names_file_and_line(
    ml100k: Path, bad_line: str, message: str
) -> None:
    lines = U_DATA.splitlines(keepends=True)
    lines[2] = bad_line
    (ml100k / "u.data").write_text("".join(lines))
    with pytest.raises(ReplayError, match=message) as info:
        list(replay_movielens(ml100k).events())
    assert info.value.line == 3
    assert info.value.path == ml100k / "u.data"
    assert f"u.data:3: {message}" in str(info.value)


def test_movielens_malformed_movie_names_file_and_line(ml100k: Path, ml_latest: Path) -> None:
    lines = U_ITEM.splitlines(keepends=True)
    lines[1] = "302|L.A. Confidential (1997)|01-Jan-1997||http://x|0|1\n"
    (ml100k / "u.item").write_text("".join(lines))
    with pytest.raises(ReplayError, match=r"u\.item:2: expected 24 '\|'-separated fields"):
        list(replay_movielens(ml100k).items())

    (ml_latest / "ratings.csv").write_text("user,movie,rating,ts\n1,1,4.0,964982703\n")
    with pytest.raises(ReplayError, match=r"ratings\.csv:1: expected the header"):
        list(replay_movielens(ml_latest).events())


def test_movielens_missing_file(ml100k: Path) -> None:
    (ml100k / "u.item").unlink()
    with pytest.raises(ReplayError, match="no MovieLens files"):
        replay_movielens(ml100k)


@pytest.mark.parametrize(
    ("replace", "with_", "line", "message"),
    [
        (",cart,", ",wishlist,", 4, "unknown event_type 'wishlist'"),
        ("2019-10-01 00:00:05 UTC", "2019-09-30 23:59:00 UTC", 6, "earlier than the row before"),
        ("2019-10-01 00:00:07 UTC", "yesterday", 7, "event_time must look like"),
        (",249.99,550050854,7c90fc70\n2019-10-01 00:00:02", ",x,550050854,7c90fc70\n"
         "2019-10-01 00:00:02", 4, "price must be a number"),
        (",543.10,519107250,\n", ",543.10\n", 7, "expected 9 fields, got 7"),
    ],
)
def test_ecommerce_malformed_names_file_and_line(
    ecommerce: Path, replace: str, with_: str, line: int, message: str
) -> None:
    text = ECOMMERCE.replace(replace, with_)
    assert text != ECOMMERCE
    ecommerce.write_text(text)
    with pytest.raises(ReplayError, match=message) as info:
        list(replay_ecommerce(ecommerce))
    assert (info.value.path, info.value.line) == (ecommerce, line)


def test_ecommerce_header_is_checked(ecommerce: Path) -> None:
    ecommerce.write_text("time,type,product,user\n")
    with pytest.raises(ReplayError, match="header lacks column"):
        list(replay_ecommerce(ecommerce))
    with pytest.raises(ReplayError, match="not a known layout"):
        detect_format(ecommerce)

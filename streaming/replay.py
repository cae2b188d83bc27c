"""Replay public interaction datasets as catalog records and events of contract v1.

Three layouts, told apart by :func:`detect_format`:

``movielens-100k``
    A folder with ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``) and ``u.item``
    (latin-1, ``id|title|release date|video release date|IMDb URL|19 genre flags``;
    genre names from ``u.genre`` when present). ``u.user`` is not read: contract v1 has no
    user record, and demographics are not the context of an action.
``movielens-latest``
    A folder with ``ratings.csv`` (``userId,movieId,rating,timestamp``) and ``movies.csv``
    (``movieId,title,genres`` with ``|`` between genres).
``ecommerce``
    One CSV in the REES46 layout: ``event_time,event_type,product_id,category_id,
    category_code,brand,price,user_id,user_session`` with times like
    ``2019-10-01 00:00:00 UTC``.

Mapping
    *MovieLens*: every rating is one ``view`` event of that user on that movie, with the
    rating kept as ``context.rating`` ("4.5"). A rating proves the user consumed the movie,
    not a click path: spreading ratings over click/cart/purchase would invent behaviour
    the data does not record, and the evaluation protocol counts every rating as one
    implicit interaction anyway, so the event count equals the rating count. Events come
    in timestamp order, ties in file order. Each movie becomes an :class:`Item` whose
    category is its first genre, with ``attributes`` ``genres`` (``|``-joined) and
    ``year`` (plus ``release_date`` for 100K). ``created_at`` is the release date (100K)
    or January 1st of the title's year (latest), moved back to the first rating when that
    came earlier, and the first rating when no date is known.

    *E-commerce*: ``view`` → ``view``, ``cart`` → ``add_to_cart``, ``purchase`` →
    ``purchase``; ``remove_from_cart`` rows (other REES46 months) are skipped, as v1 has no
    such event; ``user_session`` becomes ``session_id``. Each product becomes an item with
    category ``category_code`` (or ``category_id`` when the code is empty), a title from
    brand and category ("Lenovo notebook"), the first price seen and ``created_at`` = its
    first event. The file must be in time order (REES46 exports are) and is streamed
    twice: once for the catalog, once for the events, so it is never loaded whole.

Ids
    ``event_id`` is ``uuid5(REPLAY_NAMESPACE, "<folder>/<file>:<line>")`` (``<folder>``
    replaced by ``dataset=`` when given): replaying the same files twice yields the same
    ids, so downstream deduplication makes a replay idempotent. User and item ids are
    the dataset's own.

Examples
--------
>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp()) / "tiny"
>>> folder.mkdir()
>>> _ = (folder / "movies.csv").write_text("movieId,title,genres\\n1,Heat (1995),Action|Crime\\n")
>>> _ = (folder / "ratings.csv").write_text(
...     "userId,movieId,rating,timestamp\\n7,1,4.5,900000100\\n8,1,3.0,900000000\\n")
>>> source = replay_movielens(folder)
>>> [type(r).__name__ for r in source]
['Item', 'Event', 'Event']
>>> [(e.user_id, e.context.model_extra["rating"]) for e in source.events()]
[('8', '3'), ('7', '4.5')]
>>> next(source.items()).category
'Action'
"""

from __future__ import annotations

import csv
import re
import uuid
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ValidationError

from streamrec.contract import Context, Event, EventType, Item, describe_error

__all__ = [
    "REPLAY_NAMESPACE",
    "EcommerceReplay",
    "MovieLensReplay",
    "ReplayError",
    "ReplayFormat",
    "ReplaySource",
    "detect_format",
    "replay_ecommerce",
    "replay_movielens",
]

ReplayFormat = Literal["movielens-100k", "movielens-latest", "ecommerce"]

#: Namespace of replayed event ids (fixed forever: changing it changes every id).
REPLAY_NAMESPACE = uuid.UUID("5b0f4a52-7c1e-4d0b-9a57-2f3c8e61d0a4")

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_TITLE_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")  # "(2006-2007)" too
ECOMMERCE_COLUMNS = ("event_time", "event_type", "product_id", "user_id")
_ECOMMERCE_TYPES = {
    "view": EventType.VIEW,
    "cart": EventType.ADD_TO_CART,
    "purchase": EventType.PURCHASE,
}
_ECOMMERCE_SKIPPED = frozenset({"remove_from_cart"})


class ReplayError(ValueError):
    """A replay input is missing or malformed; names the file and, when known, the line."""

    def __init__(self, path: Path, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


def _event_id(key: str, line: int) -> str:
    return str(uuid.uuid5(REPLAY_NAMESPACE, f"{key}:{line}"))


def _file_key(path: Path, dataset: str | None) -> str:
    return f"{dataset or path.resolve().parent.name}/{path.name}"


class ReplaySource(ABC):
    """A dataset as records: the whole catalog first, then the events in time order.

    Iterating the source yields both; :meth:`items` and :meth:`events` give each part.
    Every iteration re-reads the files, so a source can be replayed again.
    """

    format: ReplayFormat
    path: Path

    @abstractmethod
    def items(self) -> Iterator[Item]:
        """Catalog records."""

    @abstractmethod
    def events(self) -> Iterator[Event]:
        """Events in non-decreasing ``ts`` order."""

    def __iter__(self) -> Iterator[Event | Item]:
        yield from self.items()
        yield from self.events()


# --- MovieLens ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Movie:
    line: int
    movie_id: int
    title: str
    genres: list[str]
    released: datetime | None
    attributes: dict[str, str]


@dataclass(frozen=True)
class _Layout:
    format: ReplayFormat
    ratings: str
    movies: str
    read_ratings: Callable[[Path], Iterator[tuple[int, int, int, float, int]]]
    read_movies: Callable[[Path], Iterator[_Movie]]


def _int(path: Path, line: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ReplayError(path, line, f"{what} must be an integer, got {value!r}") from None


def _rating(path: Path, line: int, value: str) -> float:
    try:
        rating = float(value)
    except ValueError:
        raise ReplayError(path, line, f"rating must be a number, got {value!r}") from None
    if not 0 <= rating <= 10:
        raise ReplayError(path, line, f"rating {rating:g} is outside 0..10")
    return rating


def _read_100k_ratings(path: Path) -> Iterator[tuple[int, int, int, float, int]]:
    with path.open(encoding="latin-1") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            parts = text.rstrip("\r\n").split("\t")
            if len(parts) != 4:
                raise ReplayError(
                    path, line, f"expected 4 tab-separated fields "
                    f"(user, item, rating, timestamp), got {len(parts)}"
                )
            yield (
                line,
                _int(path, line, parts[0], "user id"),
                _int(path, line, parts[1], "item id"),
                _rating(path, line, parts[2]),
                _int(path, line, parts[3], "timestamp"),
            )


def _read_latest_ratings(path: Path) -> Iterator[tuple[int, int, int, float, int]]:
    with path.open(encoding="utf-8") as f:
        header = f.readline().strip().split(",")
        if header[:4] != ["userId", "movieId", "rating", "timestamp"]:
            raise ReplayError(path, 1, "expected the header userId,movieId,rating,timestamp")
        for line, text in enumerate(f, 2):
            if not text.strip():
                continue
            parts = text.rstrip("\r\n").split(",")
            if len(parts) != len(header):
                raise ReplayError(path, line, f"expected {len(header)} fields, got {len(parts)}")
            yield (
                line,
                _int(path, line, parts[0], "userId"),
                _int(path, line, parts[1], "movieId"),
                _rating(path, line, parts[2]),
                _int(path, line, parts[3], "timestamp"),
            )


def _100k_genres(folder: Path) -> tuple[str, ...]:
    genre_file = folder / "u.genre"
    if not genre_file.exists():
        return ML100K_GENRES
    names: dict[int, str] = {}
    with genre_file.open(encoding="latin-1") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            name, sep, index = text.strip().rpartition("|")
            if not sep:
                raise ReplayError(genre_file, line, "expected 'name|index'")
            names[_int(genre_file, line, index, "genre index")] = name
    if sorted(names) != list(range(len(names))):
        raise ReplayError(genre_file, None, "genre indexes must be 0..n-1")
    return tuple(names[i] for i in range(len(names)))


def _100k_date(path: Path, line: int, value: str) -> datetime | None:
    if not value:
        return None
    try:
        day, month, year = value.split("-")
        return datetime(int(year), _MONTHS[month], int(day), tzinfo=UTC)
    except (ValueError, KeyError):
        raise ReplayError(path, line, f"release date must look like 01-Jan-1995, got {value!r}") \
            from None


def _read_100k_movies(path: Path) -> Iterator[_Movie]:
    genres = _100k_genres(path.parent)
    n_fields = 5 + len(genres)
    with path.open(encoding="latin-1") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            parts = text.rstrip("\r\n").split("|")
            if len(parts) != n_fields:
                raise ReplayError(
                    path, line, f"expected {n_fields} '|'-separated fields "
                    f"(id|title|release|video release|url|{len(genres)} genre flags), "
                    f"got {len(parts)}"
                )
            flags = parts[5:]
            if any(flag not in ("0", "1") for flag in flags):
                raise ReplayError(path, line, "genre flags must be 0 or 1")
            released = _100k_date(path, line, parts[2])
            attributes = {"release_date": released.date().isoformat()} if released else {}
            if released:
                attributes["year"] = str(released.year)
            if parts[4]:
                attributes["imdb_url"] = parts[4]
            yield _Movie(
                line=line,
                movie_id=_int(path, line, parts[0], "movie id"),
                title=parts[1],
                genres=[g for g, flag in zip(genres, flags, strict=True) if flag == "1"],
                released=released,
                attributes=attributes,
            )


def _read_latest_movies(path: Path) -> Iterator[_Movie]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or header[:3] != ["movieId", "title", "genres"]:
            raise ReplayError(path, 1, "expected the header movieId,title,genres")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 3:
                raise ReplayError(path, line, f"expected 3 fields, got {len(row)}")
            year = _TITLE_YEAR.search(row[1])
            yield _Movie(
                line=line,
                movie_id=_int(path, line, row[0], "movieId"),
                title=row[1].strip(),
                genres=[g for g in row[2].split("|") if g],
                released=datetime(int(year.group(1)), 1, 1, tzinfo=UTC) if year else None,
                attributes={"year": year.group(1)} if year else {},
            )


_LAYOUTS: dict[str, _Layout] = {
    "movielens-100k": _Layout(
        "movielens-100k", "u.data", "u.item", _read_100k_ratings, _read_100k_movies
    ),
    "movielens-latest": _Layout(
        "movielens-latest", "ratings.csv", "movies.csv", _read_latest_ratings, _read_latest_movies
    ),
}


@dataclass(frozen=True)
class _Ratings:
    """Columns of every rating, already in replay order (time, then file order)."""

    line: np.ndarray
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    ts: np.ndarray


class MovieLensReplay(ReplaySource):
    """A MovieLens folder (100K or "latest" layout) as items and rating events.

    Ratings are sorted by time, so they are read into compact columns (about 24 bytes a
    rating) rather than streamed; movies are streamed.

    Parameters
    ----------
    folder
        The dataset folder.
    format
        ``"movielens-100k"`` or ``"movielens-latest"``; :func:`replay_movielens` detects it.
    dataset
        Replaces the folder name in event id keys (keep ids stable across renames).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "u.data").write_text("1\\t10\\t5\\t880000000\\n")
    >>> _ = (folder / "u.item").write_text("10|Heat (1995)|01-Jan-1995|||0|1" + "|0" * 17 + "\\n")
    >>> src = MovieLensReplay(folder, "movielens-100k")
    >>> item = next(src.items())
    >>> item.category, item.attributes["year"]
    ('Action', '1995')
    """

    def __init__(self, folder: Path | str, format: ReplayFormat, dataset: str | None = None):
        if format not in _LAYOUTS:
            raise ValueError(f"not a MovieLens format: {format!r}")
        self.path = Path(folder)
        self.format = format
        self._layout = _LAYOUTS[format]
        self._ratings_path = self.path / self._layout.ratings
        self._movies_path = self.path / self._layout.movies
        for required in (self._ratings_path, self._movies_path):
            if not required.is_file():
                raise ReplayError(required, None, "file not found")
        self._key = _file_key(self._ratings_path, dataset)
        self._loaded: _Ratings | None = None
        self._contexts: dict[float, Context] = {}

    def _ratings(self) -> _Ratings:
        if self._loaded is None:
            cols = [array("l"), array("l"), array("l"), array("f"), array("q")]
            for row in self._layout.read_ratings(self._ratings_path):
                for col, value in zip(cols, row, strict=True):
                    col.append(value)
            line, user, item, rating, ts = (np.frombuffer(c, dtype=c.typecode) for c in cols)
            order = np.argsort(ts, kind="stable")  # stable: ties keep file order
            self._loaded = _Ratings(line[order], user[order], item[order], rating[order],
                                    ts[order])
        return self._loaded

    def items(self) -> Iterator[Item]:
        ratings = self._ratings()
        # Ratings are in time order, so a movie's first occurrence is its first rating.
        movies, first_index = np.unique(ratings.item, return_index=True)
        first_seen = dict(zip(movies.tolist(), ratings.ts[first_index].tolist(), strict=True))
        fallback = int(ratings.ts[0]) if ratings.ts.size else 0
        for movie in self._layout.read_movies(self._movies_path):
            first = first_seen.get(movie.movie_id)
            created = datetime.fromtimestamp(first if first is not None else fallback, UTC)
            if movie.released is not None and (first is None or movie.released < created):
                created = movie.released
            attributes = {"genres": "|".join(movie.genres), **movie.attributes}
            try:
                yield Item(
                    item_id=str(movie.movie_id),
                    title=movie.title or f"movie {movie.movie_id}",
                    category=movie.genres[0] if movie.genres else "unknown",
                    created_at=created,
                    attributes=attributes,
                )
            except ValidationError as exc:
                raise ReplayError(self._movies_path, movie.line, describe_error(exc)) from None

    def _context(self, rating: float) -> Context:
        ctx = self._contexts.get(rating)
        if ctx is None:
            ctx = self._contexts[rating] = Context(rating=f"{rating:g}")
        return ctx

    def events(self) -> Iterator[Event]:
        r = self._ratings()
        key = self._key
        for line, user, item, rating, ts in zip(
            r.line.tolist(), r.user.tolist(), r.item.tolist(), r.rating.tolist(), r.ts.tolist(),
            strict=True,
        ):
            try:
                yield Event(
                    event_id=_event_id(key, line),
                    event_type=EventType.VIEW,
                    user_id=str(user),
                    item_id=str(item),
                    ts=datetime.fromtimestamp(ts, UTC),
                    context=self._context(rating),
                )
            except (ValidationError, ValueError, OverflowError, OSError) as exc:
                raise ReplayError(self._ratings_path, line, describe_error(exc)) from None


# --- E-commerce (REES46) -------------------------------------------------------------------


def _parse_time(path: Path, line: int, value: str) -> datetime:
    text = value.strip()
    if text.endswith(" UTC"):
        text = text[:-4] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(
            path, line, f"event_time must look like '2019-10-01 00:00:00 UTC', got {value!r}"
        ) from None
    if dt.tzinfo is None:
        raise ReplayError(path, line, f"event_time {value!r} has no zone (expected 'UTC')")
    return dt.astimezone(UTC)


def _price(path: Path, line: int, value: str) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ReplayError(path, line, f"price must be a number, got {value!r}") from None


def _product_title(product_id: str, brand: str, category_code: str) -> str:
    leaf = category_code.rsplit(".", 1)[-1].replace("_", " ") if category_code else ""
    words = [brand.capitalize()] if brand else []
    words.append(leaf or ("product" if brand else f"product {product_id}"))
    title = " ".join(words)
    return title[0].upper() + title[1:]


@dataclass(frozen=True)
class _Row:
    line: int
    ts: datetime
    event_type: EventType | None  # None: a kind that is skipped
    product_id: str
    user_id: str
    session_id: str | None
    brand: str
    category_code: str
    category_id: str
    price: float | None


class EcommerceReplay(ReplaySource):
    """A REES46-style e-commerce behaviour CSV as products and events, streamed.

    Parameters
    ----------
    path
        The CSV file (columns found by header name; extra columns are ignored).
    dataset
        Replaces the folder name in event id keys.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.csv"
    >>> _ = path.write_text(
    ...     "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,"
    ...     "user_session\\n"
    ...     "2019-10-01 00:00:01 UTC,cart,5,77,computers.notebook,lenovo,251.74,9,s1\\n")
    >>> src = EcommerceReplay(path)
    >>> item, event = list(src)
    >>> item.title, item.category, event.event_type.value, event.session_id
    ('Lenovo notebook', 'computers.notebook', 'add_to_cart', 's1')
    """

    format: ReplayFormat = "ecommerce"

    def __init__(self, path: Path | str, dataset: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ReplayError(self.path, None, "file not found")
        self._key = _file_key(self.path, dataset)

    def _rows(self) -> Iterator[_Row]:
        """Every row parsed and checked, so both passes fail alike on the same line."""
        with self.path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            missing = [c for c in ECOMMERCE_COLUMNS if c not in header]
            if missing:
                raise ReplayError(self.path, 1, f"header lacks column(s) {', '.join(missing)}")
            last: datetime | None = None
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                if len(row) != len(header):
                    raise ReplayError(
                        self.path, line, f"expected {len(header)} fields, got {len(row)}"
                    )
                fields = dict(zip(header, row, strict=True))
                kind = fields["event_type"]
                if kind not in _ECOMMERCE_TYPES and kind not in _ECOMMERCE_SKIPPED:
                    raise ReplayError(
                        self.path, line,
                        f"unknown event_type {kind!r} (expected view, cart, purchase)",
                    )
                ts = _parse_time(self.path, line, fields["event_time"])
                if last is not None and ts < last:
                    raise ReplayError(
                        self.path, line,
                        f"event_time {fields['event_time']} is earlier than the row before; "
                        "the file must be sorted by event_time",
                    )
                last = ts
                yield _Row(
                    line=line,
                    ts=ts,
                    event_type=_ECOMMERCE_TYPES.get(kind),
                    product_id=fields["product_id"],
                    user_id=fields["user_id"],
                    session_id=fields.get("user_session") or None,
                    brand=fields.get("brand", ""),
                    category_code=fields.get("category_code", ""),
                    category_id=fields.get("category_id", ""),
                    price=_price(self.path, line, fields.get("price", "")),
                )

    def items(self) -> Iterator[Item]:
        seen: set[str] = set()
        for row in self._rows():
            if row.product_id in seen:
                continue
            seen.add(row.product_id)
            attributes = {k: v for k, v in (("brand", row.brand),
                                             ("category_code", row.category_code),
                                             ("category_id", row.category_id)) if v}
            try:
                yield Item(
                    item_id=row.product_id,
                    title=_product_title(row.product_id, row.brand, row.category_code),
                    category=row.category_code or row.category_id or "unknown",
                    price=row.price,
                    created_at=row.ts,
                    attributes=attributes,
                )
            except ValidationError as exc:
                raise ReplayError(self.path, row.line, describe_error(exc)) from None

    def events(self) -> Iterator[Event]:
        for row in self._rows():
            if row.event_type is None:
                continue  # a kind v1 has no event for (remove_from_cart)
            try:
                yield Event(
                    event_id=_event_id(self._key, row.line),
                    event_type=row.event_type,
                    user_id=row.user_id,
                    item_id=row.product_id,
                    ts=row.ts,
                    session_id=row.session_id,
                )
            except ValidationError as exc:
                raise ReplayError(self.path, row.line, describe_error(exc)) from None


# --- entry points ---------------------------------------------------------------------------


def detect_format(path: Path | str) -> ReplayFormat:
    """Which layout ``path`` holds: a MovieLens folder (or a file in one), or an e-commerce CSV.

    Raises :class:`ReplayError` when nothing known is there.
    """
    p = Path(path)
    if p.is_file():
        for layout in _LAYOUTS.values():
            if p.name in (layout.ratings, layout.movies) and (p.parent / layout.ratings).is_file():
                return layout.format
        with p.open(encoding="utf-8", errors="replace", newline="") as f:
            header = next(csv.reader(f), [])
        if all(c in header for c in ECOMMERCE_COLUMNS):
            return "ecommerce"
        raise ReplayError(p, 1, "not a known layout: expected an e-commerce CSV header "
                                f"with {', '.join(ECOMMERCE_COLUMNS)}")
    if p.is_dir():
        for layout in _LAYOUTS.values():
            if (p / layout.ratings).is_file() and (p / layout.movies).is_file():
                return layout.format
        raise ReplayError(p, None, "no MovieLens files here (u.data + u.item, or "
                                   "ratings.csv + movies.csv)")
    raise ReplayError(p, None, "no such file or folder")


def replay_movielens(path: Path | str, *, dataset: str | None = None) -> MovieLensReplay:
    """Replay a MovieLens folder (or a file inside it), 100K or "latest" layout."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "ecommerce":
        raise ReplayError(p, None, "this is an e-commerce CSV; use replay_ecommerce")
    return MovieLensReplay(p if p.is_dir() else p.parent, fmt, dataset)


def replay_ecommerce(path: Path | str, *, dataset: str | None = None) -> EcommerceReplay:
    """Replay a REES46-style e-commerce behaviour CSV."""
    return EcommerceReplay(path, dataset)

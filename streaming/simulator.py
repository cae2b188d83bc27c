"""A seeded shop simulator: users with planted tastes browse, click and buy from a catalog.

Everything the pipeline sees is generated from latent truth that the simulator keeps and
exposes (:meth:`Simulator.user_preferences`, :meth:`Simulator.item_category`), so a model
trained on its stream can be checked against what was planted.

The world
    A catalog spread over up to 20 categories ("Shoes/Running", "Home/Coffee", …) with
    titles that carry the category's meaning, per-category prices and a Zipf popularity
    inside each category. Users have a Dirichlet preference over categories (a few dominant
    ones), a home country with its time zone and a preferred device. New items are launched
    over time; each is emitted as an :class:`~streamrec.contract.Item` before any event
    mentions it.

Sessions
    Sessions start as a Poisson process whose rate follows each user's local hour of day.
    A session stays on one category with occasional drift to another preferred one and
    runs through this funnel, which fixes what each event type means:

    ==============  ====================================================================
    ``impression``  a recommendation slate was shown (``items``, ``request_id``)
    ``click``       on a slate item (same ``request_id``, ``position``), which opens the
                    product page; or, on a product page, an engaged click (gallery,
                    reviews, sizes) — the stronger signal after a view
    ``view``        a product page was shown (navigated to, or opened from a slate)
    ``add_to_cart`` only after a click and a view of the item in the same session
    ``purchase``    at checkout, the end of the session, for some carted items
    ==============  ====================================================================

    Slates are clicked by a cascade: positions are examined in order, each one attracts
    with a probability that grows with the user's preference for its category.

Time
    Event time is simulated from ``config.start``; the stream is in non-decreasing time
    order. With ``live=True`` each record is instead stamped with the wall clock at the
    moment it is yielded, so a paced live stream never runs ahead of real time.

Examples
--------
>>> sim = Simulator(SimulatorConfig(n_users=50, n_items=200, n_categories=8, seed=7))
>>> len(sim.catalog())
200
>>> records = list(sim.events(500))
>>> sum(isinstance(r, Event) for r in records)
500
>>> first = next(r for r in records if isinstance(r, Event))
>>> prefs = sim.user_preferences(first.user_id)
>>> round(sum(prefs.values()), 6)
1.0
>>> [r.event_id for r in sim.events(3)] == [r.event_id for r in sim.events(3)]
True
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import accumulate

import numpy as np

from streamrec.contract import Context, Device, Event, EventType, Item

__all__ = [
    "CATEGORIES",
    "DIURNAL",
    "CategorySpec",
    "Simulator",
    "SimulatorConfig",
    "UserProfile",
]


@dataclass(frozen=True)
class CategorySpec:
    """Vocabulary and price level of one catalog category."""

    name: str
    median_price: float
    nouns: tuple[str, ...]
    descriptors: tuple[str, ...]
    brands: tuple[str, ...]


CATEGORIES: tuple[CategorySpec, ...] = (
    CategorySpec("Shoes/Running", 110.0,
                 ("trail running shoe", "road running shoe", "racing flat", "running sneaker"),
                 ("lightweight", "cushioned", "waterproof", "responsive"),
                 ("AeroGrip", "Stride", "Pacer", "Velo")),
    CategorySpec("Electronics/Laptops", 1100.0,
                 ("ultrabook laptop", "gaming laptop", "2-in-1 laptop", "business notebook"),
                 ("14-inch", "16-inch", "thin", "high-performance"),
                 ("Voltex", "Nimbus", "Orion", "Quanta")),
    CategorySpec("Electronics/Phones", 650.0,
                 ("smartphone", "5G phone", "compact phone", "camera phone"),
                 ("unlocked", "dual-SIM", "flagship", "budget"),
                 ("Pixelon", "Nova", "Zenith", "Lumo")),
    CategorySpec("Home/Coffee", 60.0,
                 ("espresso machine", "burr coffee grinder", "pour-over kettle", "moka pot",
                  "coffee beans"),
                 ("barista", "stainless", "single-origin", "compact"),
                 ("Crema", "Roastery", "Barista Lab", "Bialetto")),
    CategorySpec("Books/Science fiction", 15.0,
                 ("space opera novel", "cyberpunk novel", "time travel novel",
                  "first contact novel"),
                 ("bestselling", "award-winning", "paperback", "hardcover"),
                 ("Starfall", "Neon Tides", "Event Horizon", "Red Dust")),
    CategorySpec("Home/Kitchen", 80.0,
                 ("chef's knife", "cast iron skillet", "blender", "stand mixer", "cookware set"),
                 ("professional", "non-stick", "forged", "compact"),
                 ("Ferro", "Kochwerk", "Santoku", "Mixa")),
    CategorySpec("Sportswear", 45.0,
                 ("running jacket", "training shorts", "compression tights", "sports bra",
                  "track top"),
                 ("breathable", "reflective", "quick-dry", "thermal"),
                 ("Stride", "Kinetic", "Apex", "Tempo")),
    CategorySpec("Outdoor/Camping", 90.0,
                 ("two-person tent", "sleeping bag", "camping stove", "headlamp",
                  "trekking poles"),
                 ("ultralight", "four-season", "packable", "rugged"),
                 ("Summit", "Ridgeline", "Basecamp", "Alpina")),
    CategorySpec("Electronics/Headphones", 150.0,
                 ("noise-cancelling headphones", "wireless earbuds", "studio headphones",
                  "sport earphones"),
                 ("over-ear", "true wireless", "bass-boosted", "hi-res"),
                 ("Sonar", "Echo", "Decibel", "Aurio")),
    CategorySpec("Books/Cooking", 25.0,
                 ("baking cookbook", "vegetarian cookbook", "pasta cookbook",
                  "weeknight dinners cookbook"),
                 ("illustrated", "bestselling", "family", "seasonal"),
                 ("Flour & Salt", "Green Table", "Nonna", "Quick Pan")),
    CategorySpec("Cycling", 60.0,
                 ("road bike helmet", "cycling jersey", "bike light set", "saddle bag",
                  "clipless pedals"),
                 ("aero", "high-visibility", "carbon", "commuter"),
                 ("Velo", "Cadence", "Peloton", "Spoke")),
    CategorySpec("Home/Furniture", 250.0,
                 ("office chair", "standing desk", "bookshelf", "two-seat sofa", "floor lamp"),
                 ("ergonomic", "oak", "minimalist", "adjustable"),
                 ("Nordhem", "Loftly", "Oakwood", "Sitwell")),
    CategorySpec("Electronics/Cameras", 700.0,
                 ("mirrorless camera", "action camera", "prime lens", "zoom lens"),
                 ("full-frame", "4K", "weather-sealed", "compact"),
                 ("Lumix", "Optica", "Aperture", "Shutterly")),
    CategorySpec("Books/History", 20.0,
                 ("history of Rome", "Second World War history", "biography",
                  "history of science"),
                 ("annotated", "illustrated", "definitive", "paperback"),
                 ("Chronicle", "Archive", "Legacy", "Meridian")),
    CategorySpec("Toys/Building", 40.0,
                 ("building bricks set", "robotics kit", "marble run", "model train set"),
                 ("STEM", "500-piece", "motorised", "starter"),
                 ("Brickle", "Robo", "Tinker", "Constructo")),
    CategorySpec("Beauty/Skincare", 25.0,
                 ("face serum", "moisturiser", "SPF 50 sunscreen", "gentle cleanser"),
                 ("hydrating", "fragrance-free", "vitamin C", "sensitive-skin"),
                 ("Dermalux", "Pure Leaf", "Glow", "Aqualis")),
    CategorySpec("Grocery/Tea", 10.0,
                 ("green tea", "black tea", "herbal tea", "matcha powder"),
                 ("organic", "loose-leaf", "ceremonial", "decaf"),
                 ("Teahouse", "Leaf & Co", "Darjee", "Kyoto Garden")),
    CategorySpec("Pets/Dogs", 30.0,
                 ("dog food", "dog leash", "chew toy", "orthopaedic dog bed"),
                 ("grain-free", "reflective", "durable", "washable"),
                 ("Pawsome", "Barkley", "Woofer", "Canis")),
    CategorySpec("Gaming/Consoles", 300.0,
                 ("game console", "wireless controller", "gaming headset", "racing wheel"),
                 ("next-gen", "limited edition", "pro", "portable"),
                 ("Playmax", "Xenon", "Arcadia", "Pixel Forge")),
    CategorySpec("Garden/Tools", 45.0,
                 ("cordless hedge trimmer", "garden hose", "pruning shears", "lawn mower"),
                 ("battery-powered", "expandable", "heavy-duty", "quiet"),
                 ("Greenline", "Hortus", "Yardly", "Bloom")),
)

_MODELS = ("X", "Pro", "Lite", "Max", "Air", "Plus", "Mini", "2", "3", "5", "42", "500")

# (ISO code, share of users, UTC offset in hours): the offset moves each user's daily peak.
_COUNTRIES = (
    ("US", 0.30, -5), ("DE", 0.12, 1), ("GB", 0.10, 0), ("FR", 0.08, 1), ("IN", 0.08, 5),
    ("BR", 0.07, -3), ("JP", 0.06, 9), ("ES", 0.04, 1), ("IT", 0.04, 1), ("CA", 0.04, -5),
    ("NL", 0.03, 1), ("PL", 0.02, 1), ("AU", 0.02, 10),
)
_DEVICES = (Device.MOBILE, Device.DESKTOP, Device.TABLET)
_DEVICE_SHARES = (0.55, 0.35, 0.10)

# Relative session starts per local hour 0..23: quiet nights, a lunch bump, an evening peak.
DIURNAL: tuple[float, ...] = (
    0.30, 0.18, 0.12, 0.10, 0.10, 0.15, 0.30, 0.50, 0.70, 0.80, 0.85, 0.90,
    1.00, 0.95, 0.90, 0.90, 0.95, 1.05, 1.25, 1.45, 1.55, 1.40, 1.00, 0.60,
)

# Funnel rates at full affinity (a user whose preference for the category is >= 0.5);
# they shrink with affinity. Tuned so a session converts a few percent of product views,
# the usual order of magnitude for e-commerce.
_P_STAY_ON_SLATE = 0.80  # cascade: probability of examining the next slate position
_P_SLATE_ATTRACT = (0.005, 0.12)  # (floor, + slope x affinity) per examined position
_P_CLICK = (0.05, 0.40)
_P_CART = (0.04, 0.30)
_P_PURCHASE = 0.40
_P_IMPRESSION = 0.30  # share of session steps that show a recommendation slate
_P_SLATE_FROM_SESSION = 0.4  # slate slots filled from the session's category vs. trending
_P_DRIFT = 0.15  # per step, the session moves to another category the user likes
_P_USUAL_DEVICE = 0.85
_MAX_GAP_S = 600.0  # gaps stay well inside a 30-minute session timeout

_NEW_ITEM_BOOST_RANK = 5  # a launched item is promoted like the category's 5th bestseller


@dataclass(frozen=True)
class SimulatorConfig:
    """Size, randomness and pace of the simulated shop.

    Parameters
    ----------
    n_users, n_items, n_categories
        Users, initial catalog size, and categories used (the first ``n_categories`` of
        :data:`CATEGORIES`, at most 20).
    seed
        Everything (catalog, users, every event) follows from it. A ``live`` run has the
        same catalog and users, but its stream follows the wall clock and its ids are
        its own, so a restart is never mistaken for a duplicate.
    start
        Simulated time of the first session; catalog items were created before it. Time
        advances about ``n_users * sessions_per_user_per_day * mean_events_per_session``
        events per day (7,200 with the defaults); keep the run in the past, since the
        contract rejects events stamped in the future (or use ``live``).
    mean_events_per_session
        Approximate mean session length in events (lengths are geometric).
    sessions_per_user_per_day
        Mean session rate of an average user; activity varies per user and hour.
    new_item_rate
        Mean number of items launched per simulated day.
    preference_concentration
        Dirichlet concentration per category: small values give each user few dominant
        categories.
    zipf_exponent
        Popularity skew inside a category.
    slate_size
        Items per recommendation slate.
    live
        Stamp records with the wall clock when they are yielded (``start`` becomes "now").
    """

    n_users: int = 1_000
    n_items: int = 2_000
    n_categories: int = 16
    seed: int = 0
    start: datetime = datetime(2025, 1, 1, tzinfo=UTC)
    mean_events_per_session: float = 12.0
    sessions_per_user_per_day: float = 0.6
    new_item_rate: float = 10.0
    preference_concentration: float = 0.3
    zipf_exponent: float = 1.1
    slate_size: int = 10
    live: bool = False

    def __post_init__(self) -> None:
        if self.n_users < 1:
            raise ValueError("n_users must be at least 1")
        if not 1 <= self.n_categories <= len(CATEGORIES):
            raise ValueError(f"n_categories must be between 1 and {len(CATEGORIES)}")
        if self.n_items < self.n_categories:
            raise ValueError("n_items must be at least n_categories (no empty category)")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if self.mean_events_per_session < 1:
            raise ValueError("mean_events_per_session must be at least 1")
        if self.sessions_per_user_per_day <= 0:
            raise ValueError("sessions_per_user_per_day must be positive")
        if self.new_item_rate < 0:
            raise ValueError("new_item_rate must not be negative")
        if self.preference_concentration <= 0 or self.zipf_exponent < 0:
            raise ValueError("preference_concentration must be > 0, zipf_exponent >= 0")
        if not 1 <= self.slate_size <= 100:
            raise ValueError("slate_size must be between 1 and 100")


@dataclass(frozen=True)
class UserProfile:
    """The planted truth about one simulated user."""

    user_id: str
    country: str
    utc_offset_hours: int
    device: Device
    activity: float
    preferences: dict[str, float]


class _Category:
    """Items of one category with Zipf weights, ready for O(log n) draws."""

    __slots__ = ("cum", "items", "weights")

    def __init__(self, items: list[int], weights: list[float]) -> None:
        self.items = items
        self.weights = weights
        self.cum = list(accumulate(weights))

    def add(self, item: int, weight: float) -> None:
        self.items.append(item)
        self.weights.append(weight)
        self.cum.append(self.cum[-1] + weight)

    def copy(self) -> _Category:
        return _Category(list(self.items), list(self.weights))


class Simulator:
    """Generates a catalog and a time-ordered stream of events from planted user tastes.

    Parameters
    ----------
    config
        World size, seed and pace; defaults to :class:`SimulatorConfig()`.
    clock
        Wall clock (zone-aware) used by ``live`` runs; injectable for tests.

    Examples
    --------
    >>> sim = Simulator(SimulatorConfig(n_users=20, n_items=60, n_categories=4, seed=1))
    >>> sim.categories
    ['Shoes/Running', 'Electronics/Laptops', 'Electronics/Phones', 'Home/Coffee']
    >>> item = sim.catalog()[0]
    >>> sim.item_category(item.item_id) == item.category
    True
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = cfg = config or SimulatorConfig()
        self._clock = clock or (lambda: datetime.now(UTC))
        self.start = self._clock() if cfg.live else cfg.start.astimezone(UTC)
        rng = np.random.default_rng(cfg.seed)
        specs = CATEGORIES[: cfg.n_categories]
        self.categories = [s.name for s in specs]
        k = len(specs)

        # Categories differ in overall popularity; users' tastes are drawn around it.
        self._category_share = rng.dirichlet(np.full(k, 4.0))
        self._category_cum = list(accumulate(self._category_share.tolist()))
        self._items: list[Item] = []
        self._item_ids: list[str] = []
        self._item_cat: list[int] = []
        self._by_id: dict[str, int] = {}
        members: list[list[int]] = [[] for _ in range(k)]
        sizes = 0.5 * self._category_share + 0.5 / k
        cats = rng.choice(k, size=cfg.n_items, p=sizes / sizes.sum())
        cats[:k] = np.arange(k)  # no empty category
        age_days = rng.uniform(1.0, 730.0, size=cfg.n_items)
        for idx in range(cfg.n_items):
            c = int(cats[idx])
            created = self.start - timedelta(days=float(age_days[idx]))
            self._register(self._make_item(idx, c, created.replace(microsecond=0), rng), c)
            members[c].append(idx)
        self._categories: list[_Category] = []
        for c in range(k):
            order = rng.permutation(len(members[c]))
            weights = (1.0 / (order + 1.0) ** cfg.zipf_exponent).tolist()
            self._categories.append(_Category(list(members[c]), weights))
        self._item_rng_seed = int(rng.integers(2**63))

        # Users.
        n = cfg.n_users
        alpha = cfg.preference_concentration * k * self._category_share
        self._prefs = rng.dirichlet(alpha, size=n)
        shares = np.array([c[1] for c in _COUNTRIES])
        self._user_country = rng.choice(len(_COUNTRIES), size=n, p=shares / shares.sum())
        self._user_device = rng.choice(len(_DEVICES), size=n, p=np.array(_DEVICE_SHARES))
        self._activity = rng.lognormal(0.0, 0.8, size=n)
        self.user_ids = [f"u{u:06d}" for u in range(n)]
        self._user_index = {uid: u for u, uid in enumerate(self.user_ids)}

        # Session arrivals: pick a time zone group by its weight at this UTC hour, then a
        # user inside it by activity. Memory stays O(users) whatever the hour resolution.
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []
        group_offsets: list[int] = []
        for offset in sorted({c[2] for c in _COUNTRIES}):
            idx_in = np.flatnonzero(
                np.isin(self._user_country, [i for i, c in enumerate(_COUNTRIES) if c[2] == offset])
            )
            if idx_in.size:
                self._groups.append((idx_in, np.cumsum(self._activity[idx_in])))
                group_offsets.append(offset)
        totals = [float(cum[-1]) for _, cum in self._groups]
        self._hour_cum = [
            list(accumulate(t * DIURNAL[(h + off) % 24] for t, off in zip(totals, group_offsets,
                                                                           strict=True)))
            for h in range(24)
        ]
        hour_total = [cum[-1] for cum in self._hour_cum]
        mean_total = sum(hour_total) / 24
        per_second = cfg.sessions_per_user_per_day * n / 86_400.0
        self._hour_rate = [per_second * t / mean_total for t in hour_total]

    # --- planted truth ------------------------------------------------------------------

    def catalog(self) -> list[Item]:
        """The items that exist at ``start`` (launches during the run come as events)."""
        return self._items[: self.config.n_items]

    def item(self, item_id: str) -> Item:
        """Any item emitted so far, initial or launched."""
        return self._items[self._by_id[item_id]]

    def item_category(self, item_id: str) -> str:
        """Category of any item emitted so far."""
        return self.categories[self._item_cat[self._by_id[item_id]]]

    def user(self, user_id: str) -> UserProfile:
        """Country, device, activity and category preferences planted for a user."""
        u = self._user_index[user_id]
        return UserProfile(
            user_id=user_id,
            country=_COUNTRIES[int(self._user_country[u])][0],
            utc_offset_hours=_COUNTRIES[int(self._user_country[u])][2],
            device=_DEVICES[int(self._user_device[u])],
            activity=float(self._activity[u]),
            preferences=self.user_preferences(user_id),
        )

    def user_preferences(self, user_id: str) -> dict[str, float]:
        """The user's planted probability of each category (sums to 1)."""
        row = self._prefs[self._user_index[user_id]]
        return dict(zip(self.categories, row.tolist(), strict=True))

    # --- the stream ---------------------------------------------------------------------

    def events(self, n: int | None = None) -> Iterator[Event | Item]:
        """Events (and launched items) in non-decreasing time order.

        Parameters
        ----------
        n
            Stop after this many events (launched :class:`Item` records come on top);
            ``None`` streams forever.

        Every call replays the world from the seed: same seed, same stream (a ``live``
        run keeps the world but follows the wall clock).
        """
        return _Run(self).records(n)

    # --- construction helpers shared with runs ------------------------------------------

    def _make_item(self, idx: int, c: int, created: datetime, rng: np.random.Generator) -> Item:
        spec = CATEGORIES[c]
        noun = spec.nouns[int(rng.integers(len(spec.nouns)))]
        descriptor = spec.descriptors[int(rng.integers(len(spec.descriptors)))]
        brand = spec.brands[int(rng.integers(len(spec.brands)))]
        model = _MODELS[int(rng.integers(len(_MODELS)))]
        title = f"{descriptor} {noun} {brand} {model}"
        price = spec.median_price * math.exp(float(rng.normal(0.0, 0.35)))
        price = round(price) - 0.01 if price >= 5 else round(price, 2)
        # Simulated time is the simulator's own: whether it lies ahead of the wall clock is
        # for the consumers' skew check to judge, so validation here leaves it out.
        return Item.model_validate(
            {
                "item_id": f"i{idx:06d}",
                "title": title[0].upper() + title[1:],
                "category": spec.name,
                "price": max(price, 0.49),
                "created_at": created,
                "attributes": {"brand": brand},
            },
            context={"max_future_skew": None},
        )

    def _register(self, item: Item, c: int) -> int:
        idx = self._by_id.get(item.item_id)
        if idx is None:
            idx = len(self._items)
            self._items.append(item)
            self._item_ids.append(item.item_id)
            self._item_cat.append(c)
            self._by_id[item.item_id] = idx
        return idx


# One pending event: (type, user_id, item_id, items, session_id, context, request_id,
# position). Kept as a tuple until yielded: building the model is the costliest step, and
# a run stopped at n never builds the rest.
_Pending = tuple[
    EventType, str, str | None, list[str] | None, str, Context, str | None, int | None
]


class _Run:
    """The mutable state of one pass over the stream (RNG, clock, launched items)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        cfg = sim.config
        self.rng = random.Random(cfg.seed)
        self.item_rng = np.random.default_rng(sim._item_rng_seed)
        self.categories = [c.copy() for c in sim._categories]
        self.launched = 0
        self.heap: list[tuple[float, int, _Pending]] = []  # (ts, tie-break seq, event)
        self.seq = 0
        self.sessions = 0
        self.requests = 0
        self.contexts: dict[tuple[Device, str, str], Context] = {}
        # Ids are unique per world; a live run also mixes in its start so that a restart
        # with the same seed does not emit ids that downstream deduplication would drop.
        salt = f"{cfg.seed}:{sim.start.isoformat()}" if cfg.live else str(cfg.seed)
        tag = random.Random(salt).getrandbits(96)
        self.tag = f"{tag & 0xFFFFFFFF:08x}"
        self.id_prefix = (
            f"{tag >> 32 & 0xFFFFFFFF:08x}-{tag >> 64 & 0xFFFF:04x}-4{tag >> 80 & 0xFFF:03x}-"
            f"{8 | (tag & 3):x}{tag >> 2 & 0xFFF:03x}-"
        )
        t0 = sim.start.timestamp()
        self.next_session = self._next_session(t0)
        self.next_launch = self._next_launch(t0)

    # --- arrivals -----------------------------------------------------------------------

    def _next_session(self, t: float) -> float:
        """Start of the next session: thinning of an hour-of-day Poisson process."""
        rates = self.sim._hour_rate
        peak = max(rates)
        rng = self.rng
        while True:
            t_next = t + rng.expovariate(peak)
            hour = int(t_next // 3600) % 24
            if rng.random() * peak <= rates[hour]:
                return t_next
            t = t_next

    def _next_launch(self, t: float) -> float:
        rate = self.sim.config.new_item_rate
        return t + self.rng.expovariate(rate / 86_400.0) if rate > 0 else math.inf

    def records(self, n: int | None) -> Iterator[Event | Item]:
        sim = self.sim
        live = sim.config.live
        clock = sim._clock
        heap = self.heap
        pop = heapq.heappop
        last_stamp = sim.start
        remaining = math.inf if n is None else n
        if remaining <= 0:
            return
        prefix = self.id_prefix
        made = 0
        template = Event.model_construct(
            event_id=prefix + "0" * 12, event_type=EventType.VIEW, user_id="-", item_id="-",
            ts=sim.start,
        )
        while True:
            horizon = min(self.next_session, self.next_launch)
            while heap and heap[0][0] <= horizon:
                ts, _, p = pop(heap)
                if live:
                    last_stamp = stamp = max(clock(), last_stamp)
                else:
                    stamp = datetime.fromtimestamp(ts, UTC)
                # Values were produced here and are valid by construction; validating each
                # again would cost more than generating it (the tests round-trip every kind
                # of record through parse_event instead). Copying a template is the cheapest
                # unvalidated construction pydantic offers.
                yield template.model_copy(update={
                    "event_id": f"{prefix}{made:012x}", "event_type": p[0], "user_id": p[1],
                    "item_id": p[2], "items": p[3], "ts": stamp, "session_id": p[4],
                    "context": p[5], "request_id": p[6], "position": p[7],
                })
                made += 1
                remaining -= 1
                if remaining <= 0:
                    return
            if self.next_launch <= self.next_session:
                if live:
                    last_stamp = created = max(clock(), last_stamp)
                else:
                    created = datetime.fromtimestamp(horizon, UTC)
                yield self._launch(created)
                self.next_launch = self._next_launch(horizon)
            else:
                self._session(horizon)
                self.next_session = self._next_session(horizon)

    # --- catalog growth -----------------------------------------------------------------

    def _launch(self, created: datetime) -> Item:
        sim = self.sim
        c = bisect.bisect(sim._category_cum, self.rng.random() * sim._category_cum[-1])
        c = min(c, len(self.categories) - 1)
        idx = sim.config.n_items + self.launched
        self.launched += 1
        item = sim._make_item(idx, c, created, self.item_rng)
        idx = sim._register(item, c)
        boost = 1.0 / (_NEW_ITEM_BOOST_RANK ** sim.config.zipf_exponent)
        self.categories[c].add(idx, boost)
        return item

    # --- sessions -----------------------------------------------------------------------

    def _pick_item(self, c: int) -> int:
        cat = self.categories[c]
        return cat.items[bisect.bisect(cat.cum, self.rng.random() * cat.cum[-1])]

    def _context(self, device: Device, country: str, page: str) -> Context:
        key = (device, country, page)
        ctx = self.contexts.get(key)
        if ctx is None:
            ctx = self.contexts[key] = Context(device=device, country=country, page=page)
        return ctx

    def _pick_user(self, t: float) -> int:
        sim = self.sim
        rng = self.rng
        cum = sim._hour_cum[int(t // 3600) % 24]
        g = min(bisect.bisect(cum, rng.random() * cum[-1]), len(cum) - 1)
        members, act = sim._groups[g]
        pos = int(np.searchsorted(act, rng.random() * act[-1], side="right"))
        return int(members[min(pos, members.size - 1)])

    def _session(self, t0: float) -> None:
        sim = self.sim
        rng = self.rng
        rnd = rng.random
        expo = rng.expovariate
        u = self._pick_user(t0)
        user_id = sim.user_ids[u]
        country = _COUNTRIES[int(sim._user_country[u])][0]
        device = (
            _DEVICES[int(sim._user_device[u])] if rnd() < _P_USUAL_DEVICE
            else rng.choices(_DEVICES, _DEVICE_SHARES)[0]
        )
        home, product, checkout = (
            self._context(device, country, page) for page in ("home", "product", "checkout")
        )
        prefs = sim._prefs[u].tolist()
        pref_cum = list(accumulate(prefs))
        n_cat = len(prefs)
        affinity = [min(1.0, 2.0 * p) for p in prefs]
        item_cat = sim._item_cat
        item_ids = sim._item_ids
        session_id = f"s-{self.tag}-{self.sessions:x}"
        self.sessions += 1
        mean = sim.config.mean_events_per_session
        # Geometric length with the configured mean (>= 1 event).
        length = 1 + int(math.log(1.0 - rnd()) / math.log(1.0 - 1.0 / mean)) if mean > 1 else 1
        length = min(length, 500)

        out: list[tuple[float, _Pending]] = []
        # On the millisecond grid, and never before events already emitted up to t0.
        t = math.ceil(t0 * 1000.0) / 1000.0

        def emit(gap: float, etype: EventType, item: int | None, ctx: Context,
                 slate: list[str] | None = None, request: str | None = None,
                 position: int | None = None) -> None:
            nonlocal t
            if gap:
                t = round(t + min(expo(1.0 / gap), _MAX_GAP_S), 3)
            item_id = item_ids[item] if item is not None else None
            out.append((t, (etype, user_id, item_id, slate, session_id, ctx, request, position)))

        def pick_category() -> int:
            return min(bisect.bisect(pref_cum, rnd() * pref_cum[-1]), n_cat - 1)

        c = pick_category()
        carted: list[int] = []
        while len(out) < length:
            if rnd() < _P_DRIFT:
                c = pick_category()
            if rnd() < _P_IMPRESSION:
                request = f"r-{self.tag}-{self.requests:x}"
                self.requests += 1
                slate = self._slate(c)
                emit(20.0 if out else 0.0, EventType.IMPRESSION, None, home,
                     [item_ids[i] for i in slate], request)
                chosen = -1
                for pos, i in enumerate(slate):
                    if rnd() < _P_SLATE_ATTRACT[0] + _P_SLATE_ATTRACT[1] * affinity[item_cat[i]]:
                        chosen = pos
                        break
                    if rnd() > _P_STAY_ON_SLATE:
                        break
                if chosen < 0:
                    continue
                item = slate[chosen]
                emit(4.0, EventType.CLICK, item, home, None, request, chosen)
                emit(1.5, EventType.VIEW, item, product)
                clicked = True
            else:
                item = self._pick_item(c)
                emit(30.0 if out else 0.0, EventType.VIEW, item, product)
                clicked = rnd() < _P_CLICK[0] + _P_CLICK[1] * affinity[item_cat[item]]
                if clicked:
                    emit(8.0, EventType.CLICK, item, product)
            if (clicked and item not in carted
                    and rnd() < _P_CART[0] + _P_CART[1] * affinity[item_cat[item]]):
                emit(12.0, EventType.ADD_TO_CART, item, product)
                carted.append(item)
        gap = 45.0
        for item in carted:
            if rnd() < _P_PURCHASE:
                emit(gap, EventType.PURCHASE, item, checkout)
                gap = 2.0

        heap = self.heap
        push = heapq.heappush
        seq = self.seq
        for ts, p in out:
            push(heap, (ts, seq, p))
            seq += 1
        self.seq = seq

    def _slate(self, c: int) -> list[int]:
        """A slate as a simple production recommender fills it: trending plus on-topic."""
        sim = self.sim
        rnd = self.rng.random
        categories = self.categories
        cat_cum = sim._category_cum
        total = cat_cum[-1]
        last = len(categories) - 1
        size = min(sim.config.slate_size, len(sim._items))
        chosen: list[int] = []
        # Bounded retries: a tiny catalog may not have `size` distinct items to offer.
        for _ in range(size * 4):
            cat = categories[
                c if rnd() < _P_SLATE_FROM_SESSION
                else min(bisect.bisect(cat_cum, rnd() * total), last)
            ]
            item = cat.items[bisect.bisect(cat.cum, rnd() * cat.cum[-1])]
            if item not in chosen:
                chosen.append(item)
                if len(chosen) == size:
                    break
        return chosen

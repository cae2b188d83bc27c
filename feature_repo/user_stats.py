"""Long-window user aggregates, recomputed from the event log by a Spark job.

The job writes Parquet part files with ``user_id``, ``event_timestamp`` (the end of the
aggregation window) and the columns below into ``offline/user_stats`` under the home, and
``feast materialize`` loads the newest row per user into the online store.
"""

from datetime import timedelta

from entities import user
from feast import FeatureView, Field
from feast.types import Float64, Int64, String
from sources import offline_source

from features.definitions import COUNTED_TYPES, STATS_WINDOWS, count_name

user_stats_source = offline_source("user_stats", "Daily user aggregates written by Spark.")

user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    # A daily job: three days of validity survive two missed runs.
    ttl=timedelta(days=3),
    schema=[
        *(
            Field(
                name=count_name(t, w),
                dtype=Int64,
                description=f"{t.value} events of the user, last {w.name}",
            )
            for w in STATS_WINDOWS
            for t in COUNTED_TYPES
        ),
        Field(
            name="purchase_rate_30d",
            dtype=Float64,
            description="purchases / views of the user, last 30d (0 without views)",
        ),
        # A JSON object rather than Feast's Map or Json types: the file offline store cannot
        # materialize a Parquet map column, and a Json feature comes back as a dict online but
        # as a string offline, which would make training and serving disagree.
        Field(
            name="category_affinity",
            dtype=String,
            description="JSON object {category: share of the user's non-impression "
            "events, last 30d}",
        ),
        Field(
            name="avg_price_30d",
            dtype=Float64,
            description="mean price of the items of the user's non-impression events, last 30d",
        ),
    ],
    source=user_stats_source,
    online=True,
    description="User aggregates over 7 and 30 days, computed in batch from the event log.",
)

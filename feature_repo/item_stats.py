"""Long-window item aggregates, recomputed from the event log by a Spark job.

Same contract as ``user_stats``: Parquet parts in ``offline/item_stats`` under the home,
keyed by ``item_id`` and stamped with ``event_timestamp``.
"""

from datetime import timedelta

from entities import item
from feast import FeatureView, Field
from feast.types import Float64, Int64
from sources import offline_source

from features.definitions import STATS_WINDOWS

item_stats_source = offline_source("item_stats", "Daily item aggregates written by Spark.")

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(days=3),
    schema=[
        *(
            field
            for w in STATS_WINDOWS
            for field in (
                Field(
                    name=f"popularity_{w.name}",
                    dtype=Int64,
                    description=f"non-impression events on the item, last {w.name}",
                ),
                Field(
                    name=f"unique_users_{w.name}",
                    dtype=Int64,
                    description=f"distinct users with a non-impression event, last {w.name}",
                ),
                Field(
                    name=f"ctr_{w.name}",
                    dtype=Float64,
                    description=f"smoothed click-through rate, last {w.name} "
                    "(features.definitions.smoothed_ctr)",
                ),
            )
        ),
    ],
    source=item_stats_source,
    online=True,
    description="Item popularity and CTR over 7 and 30 days, computed in batch.",
)

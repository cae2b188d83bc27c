"""Real-time item features, pushed by the stream (schema: ``features.definitions.ITEM_VIEW``),
and their packed twin ``item_realtime_vector`` (see ``features.packed``)."""

from entities import item
from feast import FeatureView, Field
from feast.types import Array, Float64
from sources import REALTIME_TTL, push_view

from features.definitions import ITEM_VIEW
from features.packed import ITEM_VECTOR

item_realtime_push, item_realtime = push_view(ITEM_VIEW, item)

item_realtime_vector = FeatureView(
    name=ITEM_VECTOR.name,
    entities=[item],
    ttl=REALTIME_TTL,
    schema=[
        Field(
            name=ITEM_VECTOR.feature,
            dtype=Array(Float64),
            description=f"item_realtime's features in this order: {', '.join(ITEM_VIEW.names)}",
        )
    ],
    source=item_realtime_push,
    online=True,
    description="item_realtime packed into one vector per item, written with every "
    "item_realtime row: serving reads one value per candidate instead of 13.",
)

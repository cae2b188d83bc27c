"""Co-visitation neighbours of each item, from the item graph built by Spark.

Written by ``features/item_graph.py`` into ``offline/item_neighbors`` under the home (one
``date=`` partition per run day) and materialized online. Serving reads it for candidate
generation, so it is not part of the ``ranker_features`` service.
"""

from datetime import timedelta

from entities import item
from feast import FeatureView, Field
from feast.types import Array, Float32, String
from sources import offline_source

item_neighbors_source = offline_source(
    "item_neighbors", "Top co-visitation neighbours per item, written by the graph job."
)

item_neighbors = FeatureView(
    name="item_neighbors",
    entities=[item],
    # Neighbours stay valid until the next graph run replaces them; timedelta(0) is "forever".
    ttl=timedelta(0),
    schema=[
        Field(
            name="neighbors",
            dtype=Array(String),
            description="Items most often interacted with in the same sessions, best first",
        ),
        Field(
            name="neighbor_weights",
            dtype=Array(Float32),
            description="Co-occurrence weight of each neighbour (interaction-weighted)",
        ),
    ],
    source=item_neighbors_source,
    online=True,
    description="Co-visitation neighbours of items, for candidate generation.",
)

"""What the catalog says about an item: category, price, age and title.

Written online by the catalog worker as soon as a record arrives on the ``items`` topic
(so a brand-new item is rankable at once) and offline, under ``offline/item_profile``, by
the text-embedding batch job. The ranker reads the category for the user's category
affinity and the age for freshness; serving reads it for diversity caps and reasons.
"""

from datetime import timedelta

from entities import item
from feast import FeatureView, Field
from feast.types import Float64, Int64, String
from sources import offline_source

item_profile_source = offline_source("item_profile", "Catalog attributes of every item.")

item_profile = FeatureView(
    name="item_profile",
    entities=[item],
    # The catalog entry is valid until replaced; timedelta(0) is Feast's "forever".
    ttl=timedelta(0),
    schema=[
        Field(name="category", dtype=String, description="Catalog category"),
        Field(name="title", dtype=String, description="Catalog title"),
        Field(name="price", dtype=Float64, description="Price (missing when unknown)"),
        Field(
            name="created_at_s",
            dtype=Int64,
            description="When the item entered the catalog, seconds since the Unix epoch",
        ),
    ],
    source=item_profile_source,
    online=True,
    description="Catalog attributes of items.",
)

"""Item vectors: a co-occurrence graph embedding and a text embedding of the catalog entry.

Written by the batch jobs into ``offline/item_embeddings`` under the home. Cold-start items
get a graph-space vector projected from their text vector, so every catalog item has both.
"""

from datetime import timedelta

from entities import item
from feast import FeatureView, Field
from feast.types import Array, Float32
from sources import offline_source

GRAPH_DIM = 64
TEXT_DIM = 384

item_embeddings_source = offline_source(
    "item_embeddings", "Item vectors written by the embedding jobs."
)

item_embeddings = FeatureView(
    name="item_embeddings",
    entities=[item],
    # A vector stays valid until the next job replaces it; timedelta(0) is Feast's "forever".
    ttl=timedelta(0),
    schema=[
        Field(
            name="graph_vector",
            dtype=Array(Float32),
            vector_length=GRAPH_DIM,
            description="Word2Vec vector from random walks on the item co-occurrence graph",
        ),
        Field(
            name="text_vector",
            dtype=Array(Float32),
            vector_length=TEXT_DIM,
            description="MiniLM sentence embedding of title and category",
        ),
    ],
    source=item_embeddings_source,
    online=True,
    description="Graph and text embeddings of catalog items.",
)

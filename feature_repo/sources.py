"""Where feature data lives, and the recipe that turns a real-time view into Feast objects.

Every offline path is *relative*: Feast resolves it against ``RepoConfig.repo_path``, which
streamrec sets to its home folder (``STREAMREC_HOME``). So the registry names no machine-specific
folder, and one registry serves every process that mounts the same home.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource
from feast.types import Array, FeastType, Float64, Int64, String

from features.definitions import TIMESTAMP_FIELD, Kind, RealtimeView

OFFLINE_DIR = "offline"
"""Folder under the home holding one Parquet folder per source."""

REALTIME_TTL = timedelta(days=30)
"""How far back a point-in-time join looks for a real-time row. Counts are as of the row's
anchor, so an older row is still the user's latest state; 30 days bounds the join's scan."""

FEAST_TYPES: dict[Kind, FeastType] = {
    Kind.INT: Int64,
    Kind.FLOAT: Float64,
    Kind.STRING: String,
    Kind.STRING_LIST: Array(String),
}


def offline_source(name: str, description: str) -> FileSource:
    """A folder of Parquet part files named ``name`` under :data:`OFFLINE_DIR`."""
    return FileSource(
        name=f"{name}_parquet",
        path=f"{OFFLINE_DIR}/{name}",
        timestamp_field=TIMESTAMP_FIELD,
        description=description,
    )


def push_view(view: RealtimeView, entity: Entity) -> tuple[PushSource, FeatureView]:
    """The push source and feature view of a stream-computed view, schema from ``view``."""
    source = PushSource(
        name=f"{view.name}_push",
        batch_source=offline_source(
            view.name, f"Offline log of every {view.name} row the stream pushed."
        ),
        description=f"Rows of {view.name}, pushed by the stream worker.",
    )
    features = FeatureView(
        name=view.name,
        entities=[entity],
        ttl=REALTIME_TTL,
        schema=[
            Field(name=f.name, dtype=FEAST_TYPES[f.kind], description=f.description)
            for f in view.features
        ],
        source=source,
        online=True,
        description=f"Real-time {view.entity} features, computed incrementally by the stream.",
    )
    return source, features

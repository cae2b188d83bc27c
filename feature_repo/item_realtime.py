"""Real-time item features, pushed by the stream (schema: ``features.definitions.ITEM_VIEW``)."""

from entities import item
from sources import push_view

from features.definitions import ITEM_VIEW

item_realtime_push, item_realtime = push_view(ITEM_VIEW, item)

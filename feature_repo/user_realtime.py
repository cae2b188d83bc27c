"""Real-time user features, pushed by the stream (schema: ``features.definitions.USER_VIEW``)."""

from entities import user
from sources import push_view

from features.definitions import USER_VIEW

user_realtime_push, user_realtime = push_view(USER_VIEW, user)

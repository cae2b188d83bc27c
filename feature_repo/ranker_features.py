"""Every feature the ranker scores with; serving and training read this one service.

Views share feature names (``views_1h`` is a user and an item feature), so read it with
``full_feature_names=True``: columns are named ``<view>__<feature>``.
"""

from feast import FeatureService
from item_embeddings import item_embeddings
from item_profile import item_profile
from item_realtime import item_realtime
from item_stats import item_stats
from user_realtime import user_realtime
from user_stats import user_stats

ranker_features = FeatureService(
    name="ranker_features",
    features=[
        user_realtime, user_stats, item_realtime, item_stats, item_profile, item_embeddings
    ],
    description="User, item and embedding features of one (user, candidate item) pair.",
)

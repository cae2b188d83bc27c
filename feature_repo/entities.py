"""The two things streamrec keeps features about: users and items."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A person who views, clicks and buys; ``user_id`` of the event contract.",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalog entry; ``item_id`` of the event contract.",
)

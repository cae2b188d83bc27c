"""Request dependencies: what a route may ask of the running app.

``create_app`` puts the settings on ``app.state`` and the lifespan adds the publisher;
routes declare ``settings: SettingsDep`` or ``publisher: PublisherDep`` instead of reaching
into globals, so each app instance (and each test) stays independent.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.publisher import Publisher
from streamrec.settings import Settings


def app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def app_publisher(request: Request) -> Publisher:
    """The app's Kafka publisher (created by the lifespan, connected on first use)."""
    publisher: Publisher = request.app.state.publisher
    return publisher


SettingsDep = Annotated[Settings, Depends(app_settings)]
PublisherDep = Annotated[Publisher, Depends(app_publisher)]

"""The runnable examples in docstrings are part of the documentation: they must run.

Only modules whose examples are cheap (no broker, no Spark session, no model download) are
listed; the others are exercised by their own integration tests.
"""

import doctest
import importlib

import pytest

MODULES = [
    "features.coldstart",
    "features.definitions",
    "serving.auth",
    "serving.candidates",
    "serving.catalog",
    "serving.impressions",
    "serving.limits",
    "serving.metrics",
    "serving.models",
    "serving.recommend",
    "serving.request_stats",
    "serving.trending",
    "streaming.alignment",
    "streaming.archiver",
    "training.evaluation",
    "training.labels",
    "training.online_model",
    "training.ranking_batch",
    "training.registry",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0, f"{name} has no examples"
    assert failures == 0

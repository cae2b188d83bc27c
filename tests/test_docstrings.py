"""The runnable examples in docstrings are part of the documentation: they must run.

Only modules whose examples are cheap (no broker, no Spark session, no model download) are
listed; the others are exercised by their own integration tests.
"""

import doctest
import importlib

import pytest

MODULES = [
    "features.definitions",
    "streaming.alignment",
    "streaming.archiver",
    "training.evaluation",
    "training.ranking_batch",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0, f"{name} has no examples"
    assert failures == 0

"""Session-wide test settings: the demo's stage cache (demo/cache.py) goes to a folder of this session, so tests
neither read a developer's stored results nor leave entries in the user cache."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ["SAFESTEER_DEMO_CACHE"] = tempfile.mkdtemp(prefix="safesteer-demo-cache-")

# pytest.ini runs the suite on 2 xdist workers (--dist loadgroup: test by test, except groups). A module whose
# module-scoped fixture costs minutes is one group, so its tests run on one worker one after another and the fixture
# is built once (spread over both workers, test_openrlhf_repeat's three training runs were built twice: 2 x 130 s).
# Memory: at most two tests run at once; the heaviest pair measured (a comparison beside the Ray tests) stayed under
# 9 GB on the 24 GB machine.
GROUPED_MODULES = ("tests/openrlhf/test_openrlhf_repeat.py", "tests/test_layering.py")


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.nodeid.split("::")[0]
        if module in GROUPED_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))

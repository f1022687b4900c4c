"""Session-wide test settings: the demo's stage cache (demo/cache.py) goes to a folder of this session, so tests
neither read a developer's stored results nor leave entries in the user cache."""

from __future__ import annotations

import os
import tempfile

os.environ["SAFESTEER_DEMO_CACHE"] = tempfile.mkdtemp(prefix="safesteer-demo-cache-")

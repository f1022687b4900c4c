"""The public API resolves, and the core never imports OpenRLHF (README, "Layout": only plugin/ and
cli/train_safesteer_ray.py do)."""

import subprocess
import sys

import openrlhf_safesteer


def test_every_export_resolves():
    missing = [name for name in openrlhf_safesteer.__all__ if getattr(openrlhf_safesteer, name, None) is None]
    assert not missing


def test_core_never_imports_openrlhf():
    code = (
        "import sys, openrlhf_safesteer as s\n"
        "[getattr(s, n) for n in s.__all__]\n"
        "import openrlhf_safesteer.local.engine, openrlhf_safesteer.demo.pipeline, openrlhf_safesteer.eval.runner\n"
        "leaked = sorted(m for m in sys.modules if m == 'openrlhf' or m.startswith('openrlhf.'))\n"
        "print(leaked)\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

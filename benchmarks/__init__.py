"""Performance measurements that print ratios (`python -m benchmarks.run`); not timed tests."""

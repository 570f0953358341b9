"""Benchmarks of serverhooks under real servers; run `python -m bench.gunicorn_bench` from the repo root."""

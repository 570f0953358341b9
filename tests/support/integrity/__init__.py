"""A model-based integrity suite: seeded random walks of transactions, faults and releases,
run on real servers, judged by a model of Django's documented semantics.

    steps.py   the steps and the seeded random walk that picks them (stateful: it reads the model)
    model.py   the model and oracle: Django's atomic() bookkeeping, the server's transaction, and
               serverhooks' promises (what is committed, what raises, which session runs what)
    driver.py  runs a step on real connections in one mode (django, plain, gevent, threads)
    runner.py  sequences, server-side row checks, shrinking, the CLI (python -m tests.support.integrity)

tests/integration/test_integrity_model.py runs a fixed seed in CI; bench/integrity_long.py the
long run whose results are in bench/INTEGRITY_RESULTS.md.
"""

"""What `python -m bench.django_suite` puts inside each run of Django's own runtests.py.

- `settings_mysql` / `settings_postgres`: the settings modules (`runtests.py --settings ...`).
- `launch`: runs runtests.py in its own process, plain or with serverhooks' worker
  preparation right after every `django.setup()` (parallel test workers included).
- `recorder`: the test runner the settings name; it records every test's outcome as a JSON line.

The harness copies this package and `serverhooks/` into a snapshot per run, so that edits to
the checkout during a run cannot mix versions. Nothing here imports serverhooks at import time.
"""

"""A small Django project for the tests and the demo: a marker echo over one query."""

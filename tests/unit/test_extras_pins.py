"""The packaging extras allow no driver version the installed Django refuses to load."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import django.db.backends
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support import procs

pytestmark = pytest.mark.core


def djangos_mysqlclient_minimum() -> Version:
    """The minimum Django's MySQL backend checks at import: `if version < (2, 2, 1): raise ...`."""
    source = (Path(django.db.backends.__file__).parent / "mysql" / "base.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Name)
            and node.left.id in {"version", "version_info"}
            and isinstance(node.ops[0], ast.Lt)
            and isinstance(node.comparators[0], ast.Tuple)
        ):
            return Version(".".join(str(ast.literal_eval(part)) for part in node.comparators[0].elts))
    raise AssertionError("Django's MySQL backend no longer checks mysqlclient's version this way")


def test_the_mysql_extra_never_installs_a_mysqlclient_django_refuses() -> None:
    """Before: mysqlclient>=2.1, while Django (5.1 and later) refuses anything below 2.2.1."""
    extras = tomllib.loads((procs.REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = (Requirement(line) for line in extras["mysql"] if Requirement(line).name == "mysqlclient")
    minimum = djangos_mysqlclient_minimum()  # 2.2.1 for Django 6.1, 1.4.3 for Django 5.2
    lowest_allowed = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    assert lowest_allowed and Version(lowest_allowed[0]) >= minimum, requirement
    assert not requirement.specifier.contains(str(Version(f"{minimum.major}.{minimum.minor}.0"))), requirement

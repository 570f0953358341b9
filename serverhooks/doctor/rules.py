"""The static rules: pure functions of what was read, shared with the Django system checks.

Ids are stable and documented in the README's table; never reuse a retired one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serverhooks.doctor.django_settings import Database, Django
from serverhooks.doctor.findings import Finding, Severity

if TYPE_CHECKING:
    from serverhooks.doctor.servers import Server

ADAPTER_LINE = {
    "gunicorn": "add `from serverhooks.gunicorn import *` to gunicorn.conf.py",
    "uwsgi": "add `import = serverhooks.uwsgi` to uwsgi.ini",
    "celery": "add `import serverhooks.celery` where the Celery app is defined",
}
FORKS_AFTER_LOADING = {
    "gunicorn": "preload_app",
    "uwsgi": "the app loaded in the master (no lazy-apps)",
    "celery": "the prefork pool",
}


def _persistent(database: Database) -> bool:
    return database.conn_max_age is None or database.conn_max_age > 0


def server_rules(server: Server, django: Django | None) -> list[Finding]:
    findings: list[Finding] = []
    fix_line = ADAPTER_LINE[server.kind]
    where = f"{server.kind}: {server.source}"
    databases = django.databases if django else []
    # "serverhooks" in INSTALLED_APPS arms the fork guard (os.register_at_fork) and nothing more: it
    # protects a worker only where the server's fork runs Python's fork handlers.
    guarded_by_app = bool(django and django.serverhooks_app and server.fork_handlers_run)
    unprotected = not server.serverhooks and not guarded_by_app
    app_note = (
        " ('serverhooks' in INSTALLED_APPS arms a fork guard that uWSGI's workers never run: uWSGI forks "
        "without Python's fork handlers unless py-call-osafterfork = true)"
        if django and django.serverhooks_app and not server.fork_handlers_run
        else ""
    )
    for option, value in server.unreadable.items():
        findings.append(
            Finding(
                "serverhooks.W013",
                Severity.WARNING,
                f"{option} = {value!r} is not a number the doctor can read (not a uWSGI magic variable it knows), so "
                f"it counted 1: the findings that count sessions may be wrong.",
                f"write {option} as a number or with %k (the CPU count), or check uWSGI's own reading: "
                "uwsgi --ini ... --show-config.",
                where,
            )
        )
    if server.forks_after_loading_app and unprotected:
        persistent = [repr(d.alias) for d in databases if _persistent(d) and d.vendor != "other"]
        if persistent:
            findings.append(
                Finding(
                    "serverhooks.W001",
                    Severity.ERROR,
                    f"{FORKS_AFTER_LOADING[server.kind]} with CONN_MAX_AGE > 0 on {', '.join(persistent)}: workers "
                    "inherit the parent's open connection and interleave on it, returning other requests' "
                    f"results with HTTP 200{app_note}.",
                    fix_line + ".",
                    where,
                )
            )
        pooled = [repr(d.alias) for d in databases if d.django_pool]
        if pooled:
            findings.append(
                Finding(
                    "serverhooks.W005",
                    Severity.ERROR,
                    f"Django's PostgreSQL pool ({', '.join(pooled)}) with {FORKS_AFTER_LOADING[server.kind]}: its "
                    "class-level pools survive fork (Django ticket 36957), so workers share pooled sessions"
                    f"{app_note}.",
                    fix_line + ".",
                    where,
                )
            )
    if server.gevent:
        # Not silenced by the app: its fork guard drops inherited connections, but the storage Django
        # made before the patch stays per thread, shared by every greenlet.
        if server.forks_after_loading_app and not server.serverhooks and server.kind != "celery":
            findings.append(
                Finding(
                    "serverhooks.W004",
                    Severity.ERROR,
                    "gevent with the app loaded before the monkey patch: every greenlet of a worker shares one "
                    "connection ('DatabaseWrapper objects created in a thread can only be used in that same "
                    "thread').",
                    fix_line + ".",
                    where,
                )
            )
        for database in databases:
            if database.driver == "mysqlclient":
                findings.append(
                    Finding(
                        "serverhooks.W002",
                        Severity.WARNING,
                        f"gevent with mysqlclient ({database.described}): every query blocks the whole worker.",
                        "pip install PyMySQL, then in settings.py: import pymysql; pymysql.install_as_MySQLdb()",
                        where,
                    )
                )
            if database.driver == "psycopg2" and not (django and django.psycogreen):
                findings.append(
                    Finding(
                        "serverhooks.W003",
                        Severity.WARNING,
                        f"gevent with psycopg2 and no psycogreen ({database.described}): every query blocks the "
                        "whole worker.",
                        "pip install psycogreen (serverhooks applies it; without serverhooks call "
                        "psycogreen.gevent.patch_psycopg() at startup).",
                        where,
                    )
                )
    if server.dirty_workers and not server.serverhooks:
        persistent = [repr(d.alias) for d in databases if _persistent(d) and d.vendor != "other"]
        inherits = server.forks_after_loading_app and bool(persistent)
        findings.append(
            Finding(
                "serverhooks.W010",
                Severity.ERROR if inherits else Severity.WARNING,
                f"dirty_workers = {server.dirty_workers}: Gunicorn forks its dirty arbiter after loading the app, and "
                "the dirty workers from it, with no pre_fork or post_fork"
                + (f", so they inherit the master's connection to {', '.join(persistent)}" if inherits else "")
                + "; nothing closes the dirty workers' own sessions when they exit.",
                fix_line + ".",
                where,
            )
        )
    for database in databases:
        per_process = server.threads
        if server.gevent:
            pooled_by_us = server.serverhooks and django is not None and django.gevent_pool
            per_process = django.pool_size if pooled_by_us and django else (server.per_process_limit or 1000)
        sessions = server.processes * per_process
        if database.max_connections is not None and sessions > database.max_connections:
            findings.append(
                Finding(
                    "serverhooks.W007",
                    Severity.WARNING,
                    f"{server.processes} processes x {per_process} sessions each = {sessions}, above "
                    f"{database.described}'s max_connections ({database.max_connections}).",
                    "lower workers, threads or SERVERHOOKS['POOL_SIZE'], raise max_connections, or put PgBouncer in "
                    "front (deploy/pgbouncer).",
                    where,
                )
            )
    if django and django.debug:
        findings.append(
            Finding(
                "serverhooks.W008",
                Severity.WARNING,
                f"DEBUG=True under {server.kind}: every query is kept in connection.queries, so long-lived workers "
                "grow without bound (and errors show settings).",
                "set DEBUG = False in production settings.",
                where,
            )
        )
    if "*" in server.forwarded_allow_ips:
        findings.append(
            Finding(
                "serverhooks.W009",
                Severity.WARNING,
                "forwarded_allow_ips = '*': any client can claim any address and scheme with X-Forwarded-* headers.",
                "list only your proxy's addresses (GUNICORN_FORWARDED_ALLOW_IPS in the shipped config).",
                where,
            )
        )
    return findings


def pooler_rules(database: Database) -> list[Finding]:
    """PostgreSQL behind a transaction pooler: what must not outlive a transaction."""
    found = database.pooler
    if database.vendor != "postgresql" or found is None or found.transaction is False:
        return []
    severity = Severity.ERROR if found.transaction else Severity.WARNING
    mode = "transaction pooling" if found.transaction else "a pooler (if it pools by transaction)"
    where = f"DATABASES[{database.alias!r}]"
    findings = []
    if database.server_side_cursors:
        findings.append(
            Finding(
                "serverhooks.W011",
                severity,
                f"{database.described} is reached through {mode} ({found.seen}) with server-side cursors on: "
                "QuerySet.iterator() declares a named cursor whose next FETCH may reach another server session, "
                "failing ('cursor does not exist') or reading another client's cursor.",
                f"set DATABASES[{database.alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True.",
                where,
            )
        )
    if database.prepares_statements and not found.follows_prepared_statements:
        findings.append(
            Finding(
                "serverhooks.W012",
                severity,
                f"{database.described} is reached through {mode} ({found.seen}) with psycopg 3 server-side "
                f"binding and prepare_threshold {database.prepare_threshold}: statements prepared on one server "
                "session are executed on another ('prepared statement does not exist'), or bind another "
                "client's statement of the same name.",
                "set OPTIONS['prepare_threshold'] = None (Django's default), or use PgBouncer 1.21+ with "
                "max_prepared_statements > 0.",
                where,
            )
        )
    return findings


def settings_rules(django: Django, *, include_debug: bool = False) -> list[Finding]:
    """What Django settings alone reveal (shared with `manage.py check --deploy`).

    `include_debug`: for `check --deploy`, which is about production by definition; the doctor
    reports DEBUG per server instead (W008 in `server_rules`).
    """
    findings: list[Finding] = []
    if include_debug and django.debug:
        findings.append(
            Finding(
                "serverhooks.W008",
                Severity.WARNING,
                "DEBUG=True in production: every query is kept in connection.queries, so long-lived workers grow "
                "without bound (and errors show settings).",
                "set DEBUG = False in production settings.",
                "settings.DEBUG",
            )
        )
    for database in django.databases:
        findings += pooler_rules(database)
        if database.vendor != "mysql" or database.health_checks or not _persistent(database):
            continue
        too_long = database.conn_max_age is None or (
            database.wait_timeout is not None and database.conn_max_age > database.wait_timeout
        )
        if too_long:
            limit = "unlimited" if database.conn_max_age is None else f"{database.conn_max_age:g} s"
            server_limit = "" if database.wait_timeout is None else f" (wait_timeout {database.wait_timeout} s)"
            findings.append(
                Finding(
                    "serverhooks.W006",
                    Severity.WARNING,
                    f"CONN_MAX_AGE {limit} outlives the MySQL server's idle limit{server_limit} on "
                    f"{database.described}, without CONN_HEALTH_CHECKS: the first query after a quiet spell fails "
                    "with 2006.",
                    "set CONN_HEALTH_CHECKS = True, or CONN_MAX_AGE below wait_timeout.",
                    f"DATABASES[{database.alias!r}]",
                )
            )
    return findings

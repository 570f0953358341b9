"""The `serverhooks doctor` command line: is this deployment affected, before and while it bites?

    serverhooks doctor [-c gunicorn.conf.py] [--ini uwsgi.ini] [--celery-app proj.celery:app]
    serverhooks doctor --pid <master pid>
    ... [--json] [--no-live-db]

Static mode reads the configuration through the servers' own loaders and Django's
settings (DJANGO_SETTINGS_MODULE) and reports risky combinations. Live mode reads a
running master and its workers through /proc. Exit status: 0 nothing at warning level
or above, 1 something was, 2 the doctor could not run (the message says why).
"""

from __future__ import annotations

import argparse
import os
import sys

from serverhooks._log import describe_error, redact
from serverhooks.doctor import django_settings, live, render, rules, servers
from serverhooks.doctor.findings import DoctorError, Finding, Severity

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serverhooks doctor",
        description="Report whether a Django deployment shares database connections across processes, "
        "threads or greenlets, and how to fix it.",
    )
    parser.add_argument("-c", "--config", metavar="gunicorn.conf.py", help="a Gunicorn config file")
    parser.add_argument("--ini", metavar="uwsgi.ini", help="a uWSGI ini file")
    parser.add_argument("--celery-app", metavar="MODULE:APP", help="a Celery app, e.g. proj.celery:app")
    parser.add_argument("--pid", type=int, help="inspect a running Gunicorn, uWSGI or Celery master")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-live-db", action="store_true", help="do not connect to the databases")
    return parser


def run(args: argparse.Namespace) -> tuple[list[str], list[Finding], list[live.ProcessSockets] | None]:
    header: list[str] = []
    findings: list[Finding] = []
    processes = None
    if args.pid is not None:
        seen = live.inspect(
            args.pid, extra_ports=django_settings.database_ports(), extra_paths=django_settings.database_socket_paths()
        )
        deeper = len(seen.processes) - 1 - seen.workers
        header.append(
            f"serverhooks doctor: live {seen.kind} master {args.pid} and {seen.workers} worker(s)"
            + (f", {deeper} process(es) below them" if deeper > 0 else "")
        )
        header += seen.notes
        findings += live.shared_socket_findings(seen.kind, seen.processes)
        return header, findings, seen.processes
    config = args.config or (
        "gunicorn.conf.py" if not (args.ini or args.celery_app) and os.path.exists("gunicorn.conf.py") else None
    )
    ini = args.ini or ("uwsgi.ini" if not (args.config or args.celery_app) and os.path.exists("uwsgi.ini") else None)
    found = []
    if config:
        found.append(servers.read_gunicorn(config))
    if ini:
        found.append(servers.read_uwsgi(ini))
    if args.celery_app:
        found.append(servers.read_celery(args.celery_app))
    django = django_settings.read_django(live=not args.no_live_db)
    if not found and django is None:
        raise DoctorError(
            "nothing to check: give -c gunicorn.conf.py, --ini uwsgi.ini, --celery-app or --pid, "
            "and set DJANGO_SETTINGS_MODULE"
        )
    for server in found:
        header.append(
            f"serverhooks doctor: {server.kind} config {server.source} "
            f"(serverhooks {'installed' if server.serverhooks else 'not installed'})"
        )
        findings += rules.server_rules(server, django)
    if django is not None:
        header.append(f"Django settings: {django.settings_module}")
        findings += rules.settings_rules(django)
        unreachable = [d for d in django.databases if d.live_error]
        if unreachable:
            first = unreachable[0]
            raise DoctorError(
                f"database {first.described} does not answer: {first.live_error}. Start it or fix "
                "DATABASES, or check the configuration alone with --no-live-db."
            )
    return header, findings, processes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        header, findings, processes = run(args)
    except DoctorError as exc:
        print(f"serverhooks doctor: {redact(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a doctor must never answer with a traceback
        print(f"serverhooks doctor: could not run: {describe_error(exc)}", file=sys.stderr)
        return 2
    status = 1 if any(finding.severity >= Severity.WARNING for finding in findings) else 0
    output = (
        render.as_json(header, findings, processes, status) if args.json else render.table(header, findings, processes)
    )
    print(output)
    return status

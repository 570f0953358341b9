"""The doctor's output: a readable table (colour on a terminal only) or JSON."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Any

from serverhooks._log import redact
from serverhooks.doctor.findings import Finding, Severity
from serverhooks.doctor.live import ProcessSockets

_COLOURS = {Severity.ERROR: "\033[31m", Severity.WARNING: "\033[33m", Severity.INFO: "\033[36m"}


def _use_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def table(header: list[str], findings: list[Finding], processes: list[ProcessSockets] | None) -> str:
    colour = _use_colour()
    lines = [*header, ""]
    if processes is not None:
        owners: dict[int, list[int]] = {}
        for process in processes:
            for inode in process.db_sockets:
                owners.setdefault(inode, []).append(process.pid)
        lines.append(f"{'PID':>8}  {'ROLE':<7} {'DB SESSIONS':>11}  SHARES A SOCKET WITH")
        for process in processes:
            shared = sorted({pid for inode in process.db_sockets for pid in owners[inode] if pid != process.pid})
            lines.append(
                f"{process.pid:>8}  {process.role:<7} {len(process.db_sockets):>11}  "
                + (", ".join(map(str, shared)) or "-")
            )
        lines.append("")
    if not findings:
        lines.append("No problems found.")
    for finding in sorted(findings, key=lambda f: (-f.severity, f.id)):
        name = finding.severity.name.lower()
        label = f"{_COLOURS[finding.severity]}{name:<7}\033[0m" if colour else f"{name:<7}"
        lines.append(f"{label} {finding.id}  {finding.where}")
        lines += textwrap.wrap(finding.why, 96, initial_indent="        ", subsequent_indent="        ")
        lines += textwrap.wrap("fix: " + finding.fix, 96, initial_indent="        ", subsequent_indent="             ")
    return redact("\n".join(lines))


def as_json(header: list[str], findings: list[Finding], processes: list[ProcessSockets] | None, status: int) -> str:
    data: dict[str, Any] = {
        "checked": header,
        "findings": [finding.as_dict() for finding in findings],
        "exit_status": status,
    }
    if processes is not None:
        data["processes"] = [
            {
                "pid": p.pid,
                "role": p.role,
                "parent": p.parent,
                "db_sessions": len(p.db_sockets),
                "socket_inodes": sorted(p.db_sockets),
            }
            for p in processes
        ]
    return redact(json.dumps(data, indent=2))

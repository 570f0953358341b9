"""What the doctor reports: findings with a stable id, a severity, one sentence of why, one fix."""

from __future__ import annotations

import dataclasses
import enum


class Severity(enum.IntEnum):
    INFO = 10
    WARNING = 20
    ERROR = 30


@dataclasses.dataclass(frozen=True)
class Finding:
    id: str  # "serverhooks.W001": the same ids as the Django system checks
    severity: Severity
    why: str
    fix: str
    where: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "id": self.id,
            "severity": self.severity.name.lower(),
            "why": self.why,
            "fix": self.fix,
            "where": self.where,
        }


class DoctorError(Exception):
    """The doctor could not run; the message says why (exit status 2)."""

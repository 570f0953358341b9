"""Is a PostgreSQL database reached through a transaction pooler (PgBouncer, PgDog, pgcat, Supavisor,
RDS Proxy)? Behind one, consecutive transactions of one Django connection may run on different server
sessions, so what outlives a transaction breaks: server-side cursors (`.iterator()`) and prepared
statements.

How a pooler is recognised, most certain first:

- live (the doctor connects unless --no-live-db; `check --database`): the server reports the port it
  listens on (`current_setting('port')`). When that differs from the port Django connects to,
  something sits in between. Then the doctor asks PgBouncer's admin console (database `pgbouncer`,
  with Django's own credentials; it answers users in admin_users or stats_users) for its version,
  `pool_mode` (SHOW DATABASES, SHOW CONFIG) and `max_prepared_statements`. Without that answer the
  pool mode is unknown, and the findings say so. The same port at both ends is taken as no pooler,
  whatever the port number.
- static: the port (6432: PgBouncer's, PgDog's and pgcat's default; 6543: Supavisor's transaction
  port) or the host name (`*.proxy-*.rds.amazonaws.com`: RDS Proxy; `*.pooler.supabase.com`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from serverhooks._log import describe_error

POOLER_PORTS = {6432: "port 6432, the default of PgBouncer, PgDog and pgcat", 6543: "port 6543, Supavisor's"}


@dataclasses.dataclass(frozen=True)
class Pooler:
    seen: str  # what was seen, said in the findings
    transaction: bool | None  # True: transaction (or statement) pooling; False: session; None: unknown
    follows_prepared_statements: bool = False  # PgBouncer 1.21+ with max_prepared_statements > 0


def from_settings(host: str, port: int | None) -> Pooler | None:
    """A pooler recognised by the port or host name in DATABASES alone."""
    name = host.lower()
    if ".proxy-" in name and name.endswith(".rds.amazonaws.com"):
        return Pooler(f"HOST {host} is an RDS Proxy endpoint", None)
    if name.endswith("pooler.supabase.com"):
        return Pooler(f"HOST {host} is Supabase's pooler (Supavisor)", port == 6543 or None)
    if port in POOLER_PORTS:
        return Pooler(f"PORT {port}: {POOLER_PORTS[port]}", None)
    return None


def from_server(connect_params: dict[str, Any], driver: str, django_port: int, server_port: int, name: str) -> Pooler:
    """A proxy seen live (the server's port is not Django's); PgBouncer's admin console says which mode."""
    seen = f"Django connects to port {django_port}, the PostgreSQL server behind it listens on {server_port}"
    try:
        version, mode, max_prepared = _ask_pgbouncer(connect_params, driver, name)
    except Exception as exc:
        return Pooler(
            f"{seen}: a pooler or proxy in between (PgBouncer's admin console did not answer this user: "
            f"{describe_error(exc)}; pool mode unknown)",
            None,
        )
    follows = _version(version) >= (1, 21) and max_prepared > 0
    return Pooler(
        f"{seen}: {version}, pool_mode = {mode}, max_prepared_statements = {max_prepared}",
        mode in ("transaction", "statement"),
        follows,
    )


def _version(text: str) -> tuple[int, ...]:
    digits = next((part for part in text.split() if part[:1].isdigit()), "0")
    return tuple(int(part) for part in digits.split(".") if part.isdigit())


def _ask_pgbouncer(params: dict[str, Any], driver: str, name: str) -> tuple[str, str, int]:
    """(version, pool_mode of database `name`, max_prepared_statements) from the admin console.

    The console speaks the simple query protocol only and refuses transactions: autocommit,
    psycopg 3's ClientCursor, no Django wrapper (its connection setup sends SET commands).
    """
    params = {k: v for k, v in params.items() if k not in ("cursor_factory", "context", "prepare_threshold")}
    params.update(dbname="pgbouncer", connect_timeout=5)
    if driver == "psycopg2":
        import psycopg2

        conn: Any = psycopg2.connect(**params)
        conn.autocommit = True
    else:
        import psycopg

        conn = psycopg.connect(**params, autocommit=True, cursor_factory=psycopg.ClientCursor)
    try:
        version = _rows(conn, "SHOW VERSION")[0]["version"]
        config = {row["key"]: row["value"] for row in _rows(conn, "SHOW CONFIG")}
        database = next((row for row in _rows(conn, "SHOW DATABASES") if row["name"] == name), {})
    finally:
        conn.close()
    mode = database.get("pool_mode") or config.get("pool_mode") or "session"
    max_prepared = int(config.get("max_prepared_statements") or 0)
    return str(version), str(mode), max_prepared


def _rows(conn: Any, query: str) -> list[dict[str, Any]]:
    cursor = conn.cursor()
    try:
        cursor.execute(query)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        cursor.close()

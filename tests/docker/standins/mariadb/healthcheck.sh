#!/bin/sh
# The official image's healthcheck.sh, for the two tests compose.yml uses:
#   healthcheck.sh --connect --innodb_initialized
# It connects as root over the server's own socket, so it never reaches another server.
set -eu
password="${MARIADB_ROOT_PASSWORD:-${MYSQL_ROOT_PASSWORD:-}}"
for test in "$@"; do
    case "$test" in
        --connect) sql="SELECT 1" ;;
        --innodb_initialized)
            sql="SELECT 1 FROM information_schema.ENGINES WHERE ENGINE = 'InnoDB' AND SUPPORT IN ('YES', 'DEFAULT')" ;;
        *) echo "healthcheck.sh stand-in: $test is not supported" >&2; exit 2 ;;
    esac
    answer=$(MYSQL_PWD="$password" mariadb --protocol=socket -uroot -N -B -e "$sql") || exit 1
    [ "$answer" = 1 ] || exit 1
done

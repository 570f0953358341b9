#!/bin/sh
# The official image's contract, as much of it as compose.yml uses: a root password and a
# database from the environment on first start; arguments starting with "-" go to mariadbd.
set -eu
case "${1:-}" in -*) set -- mariadbd "$@" ;; esac
if [ "${1:-}" = mariadbd ] && [ ! -d /var/lib/mysql/mysql ]; then
    password="${MARIADB_ROOT_PASSWORD:-${MYSQL_ROOT_PASSWORD:-}}"
    if [ -z "$password" ]; then
        echo "mariadb stand-in: set MARIADB_ROOT_PASSWORD (or MYSQL_ROOT_PASSWORD)" >&2
        exit 1
    fi
    database="${MARIADB_DATABASE:-${MYSQL_DATABASE:-}}"
    quoted=$(printf '%s' "$password" | sed "s/'/''/g")
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
        --auth-root-authentication-method=normal >/dev/null
    init=/run/mysqld/init.sql
    {
        echo "ALTER USER 'root'@'localhost' IDENTIFIED BY '$quoted';"
        echo "CREATE USER 'root'@'%' IDENTIFIED BY '$quoted';"
        echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
        if [ -n "$database" ]; then echo "CREATE DATABASE IF NOT EXISTS \`$database\`;"; fi
    } >"$init"
    chown mysql:mysql "$init"
    set -- "$@" --init-file="$init"
fi
if [ "${1:-}" = mariadbd ]; then
    shift
    exec mariadbd --user=mysql "$@"
fi
exec "$@"

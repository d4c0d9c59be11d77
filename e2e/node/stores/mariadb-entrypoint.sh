#!/bin/bash
# The lab's MariaDB image (Debian's mariadb-server), with the upstream image's contract:
# on an empty data directory it creates the system tables and starts a temporary server
# with the container's arguments and configuration (so with the binary log the pod's
# config turns on); it sets the root password (MARIADB_ROOT_PASSWORD, for root@localhost
# and root@'%') without writing the binary log, then creates MARIADB_DATABASE and
# MARIADB_USER (MARIADB_PASSWORD) with the binary log written, as the upstream entrypoint
# does (a standby replicating this server gets the database, and must not take the
# account); then it runs mariadbd with the container's arguments. Runs as the pod's
# non-root user; /var/lib/mysql, /run/mysqld and /tmp are the pod's volumes.
set -euo pipefail
datadir=/var/lib/mysql
for v in MARIADB_ROOT_PASSWORD MARIADB_DATABASE MARIADB_USER MARIADB_PASSWORD; do
  [[ -n "${!v:-}" ]] || { echo "entrypoint: $v must be set" >&2; exit 1; }
done
sql_string() { printf "'%s'" "${1//\'/\'\'}"; }
if [[ ! -d "$datadir/mysql" ]]; then
  echo "entrypoint: initializing $datadir" >&2
  mariadb-install-db --datadir="$datadir" --skip-test-db --auth-root-authentication-method=normal \
    --skip-name-resolve --rpm >/dev/null
  socket=/run/mysqld/init.sock
  mariadbd --datadir="$datadir" --skip-networking --socket="$socket" "$@" &
  pid=$!
  for _ in $(seq 300); do mariadb-admin --socket="$socket" -uroot ping >/dev/null 2>&1 && break; sleep 0.1; done
  mariadb --socket="$socket" -uroot <<SQL
SET @orig_sql_log_bin = @@SESSION.SQL_LOG_BIN;
SET @@SESSION.SQL_LOG_BIN=0;
ALTER USER 'root'@'localhost' IDENTIFIED BY $(sql_string "$MARIADB_ROOT_PASSWORD");
CREATE USER 'root'@'%' IDENTIFIED BY $(sql_string "$MARIADB_ROOT_PASSWORD");
GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;
SET @@SESSION.SQL_LOG_BIN=@orig_sql_log_bin;
CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;
CREATE USER $(sql_string "$MARIADB_USER")@'%' IDENTIFIED BY $(sql_string "$MARIADB_PASSWORD");
GRANT ALL ON \`${MARIADB_DATABASE//_/\\_}\`.* TO $(sql_string "$MARIADB_USER")@'%';
SQL
  kill -TERM "$pid"
  wait "$pid" || true
  echo "entrypoint: initialized" >&2
fi
exec mariadbd --datadir="$datadir" "$@"

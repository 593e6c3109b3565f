#!/usr/bin/env bash
# PostgreSQL from Debian's package as Airflow's metadata database, in the foreground until stopped.
#
#   POSTGRES_PASSWORD=... infra/deploy/postgres.sh
#
# The tests (tests/test_airflow_deployed.py) and docker-compose.yml both start it with this script.
# First start: initdb into PGDATA with the superuser $POSTGRES_USER (password from POSTGRES_PASSWORD,
# scram-sha-256 over TCP) and the database $POSTGRES_DB. Run as root, the server runs as the
# `postgres` system user that Debian's package creates (PostgreSQL refuses to run as root).
#
# Settings (environment):
#   PGDATA             data folder (default /tmp/trackstar-postgres)
#   PGHOST, PGPORT     listen address and port (default 127.0.0.1:5432)
#   POSTGRES_USER, POSTGRES_DB   (default airflow, airflow)
#   POSTGRES_PASSWORD  required; read from the environment only
set -euo pipefail

PGDATA=${PGDATA:-/tmp/trackstar-postgres}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
POSTGRES_USER=${POSTGRES_USER:-airflow}
POSTGRES_DB=${POSTGRES_DB:-airflow}
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$PG_BIN" ] || { echo "[postgres] no PostgreSQL under /usr/lib/postgresql: apt-get install postgresql" >&2; exit 1; }

as_owner() {  # run a PostgreSQL binary as the data folder's owner: postgres when started as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  [ "$(id -u)" = 0 ] && chown postgres: "$PGDATA"
  chmod 700 "$PGDATA"
  password_file=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$password_file"
  [ "$(id -u)" = 0 ] && chown postgres: "$password_file"
  echo "[postgres] initdb $PGDATA (PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'))"
  as_owner "$PG_BIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$password_file" \
    --auth-host=scram-sha-256 --auth-local=peer --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$password_file"
  echo "CREATE DATABASE \"$POSTGRES_DB\"" | as_owner "$PG_BIN/postgres" --single -D "$PGDATA" postgres >/dev/null
fi

echo "[postgres] serving $PGDATA on $PGHOST:$PGPORT"
# The Unix socket goes into the data folder: /var/run/postgresql may not exist or be writable.
exec_args=("$PG_BIN/postgres" -D "$PGDATA" -c "listen_addresses=$PGHOST" -p "$PGPORT" -k "$PGDATA")
if [ "$(id -u)" = 0 ]; then exec runuser -u postgres -- "${exec_args[@]}"; else exec "${exec_args[@]}"; fi

#!/bin/sh
# Initialises a cluster on first start (trust authentication, listening on
# every address), then execs the command as the postgres account. setpriv
# execs in place (like gosu in the official image); runuser would stay in
# front and sleep 2 s after forwarding a SIGTERM.
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA" /run/postgresql
  chown -R postgres:postgres "$PGDATA" /run/postgresql
  runuser -u postgres -- initdb -D "$PGDATA" -A trust -U postgres >/dev/null
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  echo "host all all 0.0.0.0/0 trust" >>"$PGDATA/pg_hba.conf"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"

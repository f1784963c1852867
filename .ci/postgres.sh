# Source this file to start a throwaway PostgreSQL cluster on loopback for the tests:
#   . .ci/postgres.sh && start_test_postgres
# It exports CSO_TEST_POSTGRES_URL and stops the cluster when the calling shell exits.
# Needs Debian's postgresql package (apt-get install postgresql) and root (runs it as postgres).

start_test_postgres() {
    local bin port
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ]; then
        echo "start_test_postgres: no PostgreSQL under /usr/lib/postgresql; apt-get install postgresql" >&2
        return 1
    fi
    port=${CSO_TEST_POSTGRES_PORT:-54329}
    CSO_PGDATA=$(mktemp -d /tmp/cso-postgres.XXXXXX)
    chown postgres:postgres "$CSO_PGDATA"
    runuser -u postgres -- "$bin/initdb" -D "$CSO_PGDATA" -A trust -U postgres >/dev/null
    runuser -u postgres -- "$bin/pg_ctl" -D "$CSO_PGDATA" -l "$CSO_PGDATA/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $CSO_PGDATA -c max_connections=200 -c fsync=off" \
        start >/dev/null
    export CSO_PG_BIN="$bin" CSO_PGDATA
    export CSO_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
    trap stop_test_postgres EXIT
}

stop_test_postgres() {
    if [ -n "${CSO_PGDATA:-}" ] && [ -d "$CSO_PGDATA" ]; then
        runuser -u postgres -- "$CSO_PG_BIN/pg_ctl" -D "$CSO_PGDATA" -m fast stop >/dev/null 2>&1 || true
        rm -rf "$CSO_PGDATA"
    fi
}

#!/bin/sh
# A login role and a database of its own for each passerelle service that keeps its rows in
# PostgreSQL (users, products), taken from that service's database URL: the URL the service
# connects with is the one place its user, password and database are written.
#
# The official postgres image runs it once, when it initializes an empty data directory
# (mounted at /docker-entrypoint-initdb.d/, executable). deploy/compose.yaml mounts this file;
# deploy/kubernetes/03-postgres.yaml carries the same text in a ConfigMap (the test
# crates/passerelle/tests/deploy_artifacts.rs checks they are equal, and runs it).
#
# For each service, $USERS_DATABASE_URL (or the file named by $USERS_DATABASE_URL_FILE, a
# mounted secret), likewise PRODUCTS_:
#
#   postgres://USER:PASSWORD@HOST:PORT/DATABASE
#
# USER becomes a login role with that password (not a superuser; it may not create roles or
# databases), DATABASE a database it owns, which no other role may connect to. USER and
# DATABASE: lower-case letters, digits and `_`; PASSWORD: letters, digits and `-._~`, so that
# the URL needs no percent-encoding (`openssl rand -hex 32`). The placeholder `CHANGE-ME` is
# refused. Run again (with PGHOST and friends pointing at the server, as a superuser), it
# sets the passwords anew and creates only what is missing.
#
# `--check`: only validate the URLs (and $POSTGRES_PASSWORD_FILE, when set), without
# connecting; the containers run it before the image's entrypoint, so that a bad or
# placeholder secret stops the server before an empty data directory is initialized
# without the roles.
set -eu

fail() {
  echo "passerelle-roles: $*" >&2
  exit 1
}

# url_of USERS: the URL, from the variable or from the file the _FILE variable names.
url_of() {
  url=$(printenv "$1_DATABASE_URL" || true)
  file=$(printenv "$1_DATABASE_URL_FILE" || true)
  if [ -n "$url" ] && [ -n "$file" ]; then
    fail "both $1_DATABASE_URL and $1_DATABASE_URL_FILE are set"
  fi
  if [ -n "$file" ]; then
    url=$(cat "$file") || fail "$1_DATABASE_URL_FILE: cannot read $file"
  fi
  [ -n "$url" ] || fail "set $1_DATABASE_URL or $1_DATABASE_URL_FILE"
  printf '%s' "$url"
}

# parse NAME URL: sets user, password and database, or fails.
parse() {
  case "$2" in
    postgres://*) rest=${2#postgres://} ;;
    postgresql://*) rest=${2#postgresql://} ;;
    *) fail "$1: not a postgres:// URL" ;;
  esac
  case "$rest" in
    *:*@*/*) ;;
    *) fail "$1: not postgres://USER:PASSWORD@HOST:PORT/DATABASE" ;;
  esac
  userinfo=${rest%%@*}
  user=${userinfo%%:*}
  password=${userinfo#*:}
  database=${rest#*@}
  database=${database#*/}
  database=${database%%\?*}
  case "$user" in
    '' | *[!a-z0-9_]* | [0-9]*) fail "$1: user '$user': lower-case letters, digits and _" ;;
    postgres) fail "$1: the service's own user, not the superuser" ;;
  esac
  case "$database" in
    '' | *[!a-z0-9_]* | [0-9]*) fail "$1: database '$database': lower-case letters, digits and _" ;;
    postgres | template0 | template1) fail "$1: a database of its own, not $database" ;;
  esac
  case "$password" in
    '') fail "$1: no password" ;;
    *CHANGE-ME*) fail "$1: the password is still the placeholder CHANGE-ME" ;;
    *[!A-Za-z0-9._~-]*) fail "$1: the password may hold letters, digits and -._~ only" ;;
  esac
}

if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
  superuser=$(cat "$POSTGRES_PASSWORD_FILE") || fail "cannot read $POSTGRES_PASSWORD_FILE"
  case "$superuser" in
    '') fail "$POSTGRES_PASSWORD_FILE: no superuser password" ;;
    *CHANGE-ME*) fail "$POSTGRES_PASSWORD_FILE: the superuser's password is still the placeholder CHANGE-ME" ;;
  esac
fi

for service in USERS PRODUCTS; do
  url=$(url_of "$service")
  parse "$service" "$url"
  if [ "${1:-}" = --check ]; then
    continue
  fi
  psql --no-psqlrc --no-password --quiet -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    --set=role="$user" --set=password="$password" --set=database="$database" <<'SQL'
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS new_role,
       NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') AS new_database
\gset
\if :new_role
CREATE ROLE :"role" LOGIN PASSWORD :'password';
\else
ALTER ROLE :"role" LOGIN PASSWORD :'password';
\endif
\if :new_database
CREATE DATABASE :"database" OWNER :"role";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
\endif
SQL
  echo "passerelle-roles: role $user, database $database"
done

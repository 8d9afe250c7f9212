#!/usr/bin/env bash
# Runs once, when the TimescaleDB container initialises an empty data directory (docker-entrypoint-initdb.d),
# as the image's superuser `postgres`. Creates Meltica's two roles — least privilege, see README.md
# "Database roles":
#   meltica      owns the database and runs `meltica db upgrade` (the `migrate` service); not a superuser
#   meltica_app  what every other Meltica process connects as; the migrations grant it its rights
# The passwords come from Docker secret files, never from the environment or this file.
set -euo pipefail

owner_password="$(tr -d '\n' < /run/secrets/meltica_owner_password)"
runtime_password="$(tr -d '\n' < /run/secrets/meltica_app_password)"

psql -v ON_ERROR_STOP=1 -X -q --username "$POSTGRES_USER" --dbname postgres \
    -v owner_password="$owner_password" -v runtime_password="$runtime_password" <<'SQL'
CREATE ROLE meltica LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE meltica_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'runtime_password';
CREATE DATABASE meltica OWNER meltica;
CREATE DATABASE prefect OWNER meltica;
\connect meltica
-- The extension needs a superuser; the owner's migrations find it installed.
CREATE EXTENSION IF NOT EXISTS timescaledb;
SQL

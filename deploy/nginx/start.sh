#!/bin/sh
# Render nginx.conf.template and run nginx in the foreground, as any user.
#   PORT                where nginx listens (default 8000, as the app)
#   UPSTREAM            gunicorn: host:port or unix:/path/to.sock (default 127.0.0.1:8001)
#   MAX_CONTENT_LENGTH  request body limit in bytes (default 10485760, as the app)
#   NGINX_PREFIX        nginx's folder for the rendered config, pid and temporary files
#                       (default: a new temporary folder)
#   METRICS_ALLOW       addresses or CIDR ranges, space-separated, that may read /metrics
#                       through nginx (default "127.0.0.1 ::1", the host itself; empty:
#                       none); anything else is refused with a 403
# POSIX sh and envsubst only: it runs unchanged in the nginx image (docker-compose.yml).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export PORT="${PORT:-8000}"
export UPSTREAM="${UPSTREAM:-127.0.0.1:8001}"
export MAX_CONTENT_LENGTH="${MAX_CONTENT_LENGTH:-10485760}"
set -f  # the addresses are words, not patterns
METRICS_ALLOW_RULES=""
for address in ${METRICS_ALLOW-127.0.0.1 ::1}; do
    case "$address" in
        *[!0-9A-Fa-f.:/]*)
            echo "start.sh: METRICS_ALLOW: not an address or CIDR range: $address" >&2
            exit 1 ;;
    esac
    METRICS_ALLOW_RULES="$METRICS_ALLOW_RULES            allow $address;
"
done
set +f
export METRICS_ALLOW_RULES
prefix="${NGINX_PREFIX:-$(mktemp -d "${TMPDIR:-/tmp}/mnist-nginx.XXXXXX")}"
mkdir -p "$prefix"
# shellcheck disable=SC2016  # the names are for envsubst, not for the shell
envsubst '${PORT} ${UPSTREAM} ${MAX_CONTENT_LENGTH} ${METRICS_ALLOW_RULES}' \
    < "$here/nginx.conf.template" > "$prefix/nginx.conf"
PATH="$PATH:/usr/sbin"  # where Debian and the nginx image put it
exec nginx -p "$prefix" -c "$prefix/nginx.conf" -e stderr -g 'daemon off;'

#!/bin/sh
# Render nginx.conf.template and run nginx in the foreground, as any user.
#   PORT                where nginx listens (default 8000, as the app)
#   UPSTREAM            gunicorn: host:port or unix:/path/to.sock (default 127.0.0.1:8001)
#   MAX_CONTENT_LENGTH  request body limit in bytes (default 10485760, as the app)
#   NGINX_PREFIX        nginx's folder for the rendered config, pid and temporary files
#                       (default: a new temporary folder)
#   METRICS_ALLOW       addresses or CIDR ranges, space-separated, that may read /metrics
#                       and /v2/models/.../stats through nginx (default "127.0.0.1 ::1",
#                       the host itself; empty: none); anything else is refused with a 403
#   RATE_LIMIT_RPS      requests per second each client may send (its bearer token, else
#                       its address); more are answered 429 with Retry-After; empty: no limit
#   RATE_LIMIT_BURST    requests over that rate a client may send at once (default: RPS)
#   TLS_CERT_FILE       with TLS_KEY_FILE: HTTPS on PORT (TLS 1.2 and 1.3 with forward-secret
#   TLS_KEY_FILE        AEAD ciphers only, HTTP/2); both PEM files, the chain first
#   HTTP_REDIRECT_PORT  with TLS: a plain-HTTP port whose every request is answered 308
#                       (method and body kept) to the same path and query on PUBLIC_URL
#   PUBLIC_URL          https://host[:port] as clients reach this proxy; the redirect
#                       never takes the host from the request (its Host header)
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
PATH="$PATH:/usr/sbin"  # where Debian and the nginx image put it

whole_number() {  # name value: a positive integer, or stop
    case "$2" in
        ''|0*|*[!0-9]*) echo "start.sh: $1 must be a whole number above 0, got '$2'" >&2
                        exit 1 ;;
    esac
}
RATE_LIMIT_ZONE="" RATE_LIMIT_RULES=""
if [ -n "${RATE_LIMIT_RPS:-}" ]; then
    whole_number RATE_LIMIT_RPS "$RATE_LIMIT_RPS"
    burst="${RATE_LIMIT_BURST:-$RATE_LIMIT_RPS}"
    whole_number RATE_LIMIT_BURST "$burst"
    # shellcheck disable=SC2016  # nginx's variables, written for nginx
    RATE_LIMIT_ZONE='map $http_authorization $rate_limit_key {
        "" $binary_remote_addr;
        default $http_authorization;
    }
    limit_req_zone $rate_limit_key zone=per_token:10m rate='"$RATE_LIMIT_RPS"'r/s;'
    RATE_LIMIT_RULES="limit_req zone=per_token burst=$burst nodelay;
        limit_req_log_level warn;
        limit_req_status 429;"
fi
export RATE_LIMIT_ZONE RATE_LIMIT_RULES

LISTEN_RULES="listen $PORT;"
if [ -n "${TLS_CERT_FILE:-}${TLS_KEY_FILE:-}" ]; then
    for file in "${TLS_CERT_FILE:-}" "${TLS_KEY_FILE:-}"; do
        case "$file" in
            ''|*[\"\$\;{}]*) echo "start.sh: TLS_CERT_FILE and TLS_KEY_FILE must both be set," \
                            "to paths without quotes, \$, ; or braces" >&2
                        exit 1 ;;
        esac
        [ -r "$file" ] || { echo "start.sh: cannot read $file" >&2; exit 1; }
    done
    # "http2 on" from nginx 1.25.1 (the image's 1.28); "listen ... http2" before (Debian's).
    version=$(nginx -v 2>&1 | sed 's|.*nginx/||; s| .*||')
    minor=$(echo "$version" | cut -d. -f2) patch=$(echo "$version" | cut -d. -f3)
    if [ "${version%%.*}" -gt 1 ] || [ "$minor" -gt 25 ] || { [ "$minor" -eq 25 ] && [ "$patch" -ge 1 ]; }; then
        http2="listen $PORT ssl;
        http2 on;"
    else
        http2="listen $PORT ssl http2;"
    fi
    # Mozilla's "intermediate" profile: TLS 1.2 and 1.3, ECDHE/DHE with AEAD ciphers only.
    LISTEN_RULES="$http2
        ssl_certificate \"$TLS_CERT_FILE\";
        ssl_certificate_key \"$TLS_KEY_FILE\";
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384;
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:tls:10m;
        ssl_session_timeout 1d;
        ssl_session_tickets off;"
fi
export LISTEN_RULES

# A configured origin, not $host: nginx's $host is whatever Host the client sent (nginx
# checks only its syntax), and a Location built from it lets a cache or a link in front
# send people to another site.
REDIRECT_SERVER=""
if [ -n "${HTTP_REDIRECT_PORT:-}" ]; then
    whole_number HTTP_REDIRECT_PORT "$HTTP_REDIRECT_PORT"
    [ -n "${TLS_CERT_FILE:-}" ] && [ "$HTTP_REDIRECT_PORT" != "$PORT" ] || {
        echo "start.sh: HTTP_REDIRECT_PORT redirects to HTTPS: it needs TLS_CERT_FILE and" \
             "TLS_KEY_FILE, and a port other than PORT ($PORT)" >&2
        exit 1; }
    origin="${PUBLIC_URL:-}"
    authority="${origin#https://}"
    port="${authority##*]}"  # what follows an IPv6 literal's bracket, else all of it
    case "$port" in *:*) port="${port##*:}" ;; *) port=443 ;; esac
    # A host name (labels of 1-63 letters, digits and inner dashes, the last one not a
    # number), an IPv4 address, or an IPv6 literal in brackets (RFC 4291's forms), then
    # at most one :port of 1-65535; no path, no user, nothing nginx would read as more.
    case "$authority" in
        "$origin"|*[!]A-Za-z0-9.:[-]*) authority="" ;;
    esac
    label='[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
    octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
    ipv4="$octet(\.$octet){3}"
    h='[0-9A-Fa-f]{1,4}'
    ipv6="($h:){7}$h|($h:){1,7}:|($h:){1,6}:$h|($h:){1,5}(:$h){1,2}|($h:){1,4}(:$h){1,3}"
    ipv6="$ipv6|($h:){1,3}(:$h){1,4}|($h:){1,2}(:$h){1,5}|$h:(:$h){1,6}|:((:$h){1,7}|:)"
    ipv6="$ipv6|($h:){6}$ipv4|::($h:){0,5}$ipv4|$h::($h:){0,4}$ipv4"
    ipv6="$ipv6|($h:){0,1}$h::($h:){0,3}$ipv4|($h:){0,2}$h::($h:){0,2}$ipv4"
    ipv6="$ipv6|($h:){0,3}$h::($h:){0,1}$ipv4|($h:){0,4}$h::$ipv4"
    host="${authority%:*}"
    case "$authority" in
        \[*) ;;  # an IPv6 literal: judged whole below
        *) # a name ending in a number is an address to a browser: a valid IPv4 or refused
           if printf '%s' "$host" | grep -Eq '(^|\.)([0-9]+|0[xX][0-9A-Fa-f]*)\.?$' &&
              ! printf '%s' "$host" | grep -Eqx "$ipv4"; then
               authority=""
           fi ;;
    esac
    printf '%s' "$authority" | grep -Eqx "(($label\.)*$label\.?|\[($ipv6)\])(:[1-9][0-9]{0,4})?" \
        && [ "$port" -le 65535 ] 2>/dev/null || {
        echo "start.sh: PUBLIC_URL must be https://host or https://host:port (no path)" \
             "for HTTP_REDIRECT_PORT, got '$origin'" >&2
        exit 1; }
    # shellcheck disable=SC2016  # nginx's $request_uri: the path and query as sent
    REDIRECT_SERVER="server {
        listen $HTTP_REDIRECT_PORT;
        location / {
            return 308 $origin"'$request_uri;'"
        }
    }"
fi
export REDIRECT_SERVER
prefix="${NGINX_PREFIX:-$(mktemp -d "${TMPDIR:-/tmp}/mnist-nginx.XXXXXX")}"
mkdir -p "$prefix"
# shellcheck disable=SC2016  # the names are for envsubst, not for the shell
envsubst '${PORT} ${UPSTREAM} ${MAX_CONTENT_LENGTH} ${METRICS_ALLOW_RULES} ${RATE_LIMIT_ZONE} ${RATE_LIMIT_RULES} ${LISTEN_RULES} ${REDIRECT_SERVER}' \
    < "$here/nginx.conf.template" > "$prefix/nginx.conf"
exec nginx -p "$prefix" -c "$prefix/nginx.conf" -e stderr -g 'daemon off;'

#!/usr/bin/env bash
# `make serve-proxy`: nginx on $PORT in front of gunicorn, which listens only on a unix
# socket in a private temporary folder. Foreground; Ctrl-C (or either one exiting) stops
# both and removes the folder. Same settings as `make serve` (app/config.py).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
run=$(mktemp -d "${TMPDIR:-/tmp}/mnist-serve-proxy.XXXXXX")
# Started as root, nginx's workers run as nobody: they must reach the socket through the
# folder, which nobody can list, so its random name stays private.
chmod 711 "$run"
# nginx first, with QUIT, not TERM (which closes every connection at once): it closes
# its port at once (new clients are refused, which they may retry), finishes the requests
# in progress through gunicorn, still up, and exits. Then gunicorn, gracefully, with
# nothing left to send it. So each request is answered or refused, never cut, and nginx
# does not go on accepting with nothing behind it (gunicorn first: thousands of 503s in
# the seconds until nginx exited). If gunicorn went first on its own, nginx answers what
# it holds with a JSON 503 and Retry-After (nginx.conf.template).
gunicorn="" nginx=""
stop() {
    kill -QUIT "$nginx" 2>/dev/null || true
    wait "$nginx" 2>/dev/null || true
    kill -TERM "$gunicorn" 2>/dev/null || true
    wait "$gunicorn" 2>/dev/null || true
    rm -rf "$run"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$root"
"${GUNICORN:-$root/.venv/bin/gunicorn}" -c app/gunicorn.conf.py \
    --bind "unix:$run/gunicorn.sock" 'app:create_app()' &
gunicorn=$!
UPSTREAM="unix:$run/gunicorn.sock" NGINX_PREFIX="$run/nginx" deploy/nginx/start.sh &
nginx=$!
echo "serve-proxy: nginx on port ${PORT:-8000}, gunicorn on unix:$run/gunicorn.sock" >&2
status=0
wait -n || status=$?
exit "$status"

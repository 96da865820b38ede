#!/bin/sh
# Stop the nginx that start.sh runs, gracefully: the Kubernetes proxy's preStop hook.
#   DRAIN_SECONDS  how long to go on serving first, while the endpoints drop this pod and
#                  new connections stop arriving (default 5)
#   NGINX_PREFIX   as for start.sh: its nginx.pid is there
# Then SIGQUIT: nginx closes its port and finishes the requests in progress (within its
# worker_shutdown_timeout), where SIGTERM would cut them. It returns once nginx has gone,
# since the kubelet signals the container as soon as the hook returns.
set -eu
sleep "${DRAIN_SECONDS:-5}"
kill -QUIT "$(cat "$NGINX_PREFIX/nginx.pid")"
while [ -e "$NGINX_PREFIX/nginx.pid" ]; do  # nginx removes it as it exits
    sleep 0.2
done

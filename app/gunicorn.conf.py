"""gunicorn settings for the service: ``gunicorn -c app/gunicorn.conf.py 'app:create_app()'``.

Settings come from the same environment variables as the app (app/config.py).
"""

import atexit
import os
import shutil
import tempfile

from app.config import Config

_settings = Config.from_env()  # not "config": gunicorn reads that name as a setting
if _settings.auth_tokens_file:  # a file that does not parse stops the server here, named
    from pathlib import Path

    from app.auth import TokenFileError, TokenTable

    try:
        TokenTable.read(Path(_settings.auth_tokens_file))
    except TokenFileError as err:
        raise SystemExit(f"gunicorn: refusing to start: {err}") from None

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.workers
# gthread, with a graceful stop that serves its listen backlog (app/worker.py).
worker_class = "app.worker.DrainingThreadWorker"
threads = _settings.threads
# Never preload: the app (and TensorFlow with it) must be created in each worker after
# the fork. TensorFlow starts thread pools at import; a forked copy of them deadlocks.
preload_app = False
timeout = 60
graceful_timeout = 20
keepalive = 5
# gunicorn 25.1+ opens a control socket for ``gunicornc`` at one path per user
# ($XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl), so each gunicorn on a host
# takes it from the one started before. Nothing here uses gunicornc: signals (HUP, TERM,
# TTIN, TTOU) do what it would.
control_socket_disable = True
accesslog = None  # the app writes its own JSON access lines (app/logs.py)
errorlog = "-"
M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
loglevel = _settings.log_level.lower()

# Metrics from every worker are aggregated through files in one folder (app/metrics.py).
# gunicorn runs this file again in the same master on SIGHUP: the mark tells that run that
# the folder is prepared already and holds the live workers' files, which must stay (or
# every counter would go back to zero at each reload).
METRICS_MARK = "MNIST_SERVING_METRICS_MASTER"  # "<master pid> temporary|configured"


def _prepare_metrics_folder() -> tuple[str, bool]:
    """The workers' metrics folder, and whether it is a temporary one this master made
    (removed at exit). A configured folder loses a previous server's counts, once."""
    pid, _, kind = os.environ.get(METRICS_MARK, "").partition(" ")
    if pid == str(os.getpid()):  # a reload
        return os.environ["PROMETHEUS_MULTIPROC_DIR"], kind == "temporary"
    temporary = not _settings.prometheus_multiproc_dir
    if temporary:
        folder = tempfile.mkdtemp(prefix="mnist-serving-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(_remove_if_master, folder, os.getpid())
    else:
        folder = _settings.prometheus_multiproc_dir
        os.makedirs(folder, exist_ok=True)
        for stale in os.listdir(folder):
            if stale.endswith(".db"):
                os.remove(os.path.join(folder, stale))
    os.environ[METRICS_MARK] = f"{os.getpid()} {'temporary' if temporary else 'configured'}"
    return folder, temporary


def _remove_if_master(folder: str, master: int) -> None:
    """At the master's exit, the temporary folder goes even when ``on_exit`` is never
    called: a start refused before the arbiter runs (a gthread loop that differs, the
    port taken) exits from gunicorn's own code. Workers inherit this hook at the fork
    and must leave the folder to the master."""
    if os.getpid() == master:
        shutil.rmtree(folder, ignore_errors=True)


_metrics_dir, _metrics_dir_is_temporary = _prepare_metrics_folder()

def when_ready(server):
    """One warning at start when anyone beyond this host can call with no token asked."""
    from app.auth import is_loopback

    exposed = [address for address in server.cfg.address
               if isinstance(address, tuple) and not is_loopback(address[0])]
    if exposed and not _settings.auth_tokens_file:
        server.log.warning("listening on %s with no AUTH_TOKENS_FILE: anyone who can reach "
                           "it may call every endpoint (README, \"Security\")",
                           ", ".join(f"{host}:{port}" for host, port in exposed))


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the aggregate, and free its slot in the
    table of connections per worker (app/worker.py)."""
    from prometheus_client import multiprocess

    from app.worker import TABLE

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)
    TABLE.release(getattr(worker, "slot", None))


def on_starting(server):
    """Refuse to start when GRPC_PORT is taken: each worker binds it with SO_REUSEPORT,
    which would otherwise share it with another server (app/grpc_server.py)."""
    if _settings.grpc_port:
        from app.grpc_port import check_port_free

        check_port_free(_settings.grpc_port)


def worker_exit(server, worker):
    """Let gRPC calls in flight finish (new ones go to the other workers), answer
    requests still queued for a batch, flush the payload log (bounded), then export the
    worker's last traces."""
    grpc_server = getattr(worker, "grpc_server", None)
    if grpc_server is not None:
        grpc_server.stop(graceful_timeout)
    app = getattr(worker, "wsgi", None)
    store = getattr(app, "extensions", {}).get("model_store")
    if store is not None:
        store.close()
    payload_log = getattr(app, "extensions", {}).get("payload_log")
    if payload_log is not None:
        payload_log.close()
    from app import tracing

    tracing.shutdown(app)  # the spans of those last requests too


def on_exit(server):
    """Remove the temporary metrics folder (a configured one is the operator's)."""
    if _metrics_dir_is_temporary:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


def post_fork(server, worker):
    """Hand the GIL over sooner: a request and the batcher pass work between threads,
    and the default 5 ms switch interval can hold either one up that long. Give large
    allocations back to the system when freed (see ``_return_large_frees``). Pin the
    worker to its CPU before it starts a thread (app/affinity.py)."""
    import sys

    sys.setswitchinterval(0.0005)
    _return_large_frees()
    if getattr(worker, "cpu", None) is not None:
        from app.affinity import pin

        if pin(worker.cpu):
            server.log.info("worker %s pinned to CPU %d (CPU_AFFINITY=%s)", worker.pid,
                            worker.cpu, _settings.cpu_affinity)
        else:
            server.log.warning("worker %s could not be pinned to CPU %d: left floating",
                               worker.pid, worker.cpu)


def pre_fork(server, worker):
    """Choose the new worker's CPU here in the master, which knows the CPUs its live
    workers hold (app/affinity.py); ``post_fork`` applies it in the worker."""
    from app.affinity import allowed_cpus, cpu_for

    taken = [getattr(live, "cpu", None) for live in server.WORKERS.values()]
    worker.cpu = cpu_for(server.num_workers, allowed_cpus(), taken, _settings.cpu_affinity)


def _return_large_frees():
    """glibc serves a freed 16 MB block's successors from its per-thread heaps (the mmap
    threshold rises to the largest block freed), and those heaps keep the pages: 16
    threads decoding large images left a worker 750 MB heavier. A fixed 1 MiB threshold
    maps every decoded image and array of that size anew and unmaps it when freed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def post_worker_init(worker):
    """A worker whose model batcher died can only refuse predictions: it stops taking
    requests (those in flight finish) and the master starts a fresh one. Then start
    this worker's gRPC server."""
    from app import batching

    def retire():
        worker.log.critical("a model batcher died: replacing worker %s", worker.pid)
        worker.alive = False

    batching.on_batcher_death(retire)
    # gRPC after the fork and after the app (its store and batchers): app/grpc_server.py.
    from app import grpc_server

    worker.grpc_server = grpc_server.start(worker.wsgi)

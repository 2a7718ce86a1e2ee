"""The one publisher of the Django process (and of each Celery worker process).

A SyncServerUtil made at import connects on its first call, from a daemon thread with its own event loop;
its calls are thread-safe (runserver's threads, gunicorn's threaded workers) and after a ``fork()``
(gunicorn's or Celery's prefork pool) the child reconnects on its first call. Do not make one per request.
"""

from django.conf import settings

from fanout import SyncServerUtil

util = SyncServerUtil(
    settings.FANOUT_URL,
    namespace=settings.FANOUT_NAMESPACE,
    mode=settings.FANOUT_MODE,
    secret=settings.FANOUT_SECRET,
)

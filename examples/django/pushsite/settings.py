"""Settings of the example project: everything that differs between machines comes from the environment."""

import os

from django.core.exceptions import ImproperlyConfigured

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-development-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["fanout.django", "push"]  # fanout.django: the outbox table and manage.py fanout_relay
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "pushsite.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
WSGI_APPLICATION = "pushsite.wsgi.application"
# PostgreSQL, for the outbox (the stub login keeps the user in a signed cookie: no other table). Defaults:
# database "push" as user "postgres" on 127.0.0.1:5432; PUSH_DB_SCHEMA puts every table in that schema.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PUSH_DB_NAME", "push"),
        "USER": os.environ.get("PUSH_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("PUSH_DB_PASSWORD", ""),
        "HOST": os.environ.get("PUSH_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("PUSH_DB_PORT", "5432"),
        "OPTIONS": {"options": f"-c search_path={os.environ['PUSH_DB_SCHEMA']}"}
        if os.environ.get("PUSH_DB_SCHEMA")
        else {},
    }
}
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
USE_TZ = True

# fanout: where the nodes' broker is, and the namespace / mode / secret the nodes run with
FANOUT_URL = os.environ.get("FANOUT_URL", "redis://127.0.0.1:6379/0")
FANOUT_NAMESPACE = os.environ.get("FANOUT_NAMESPACE", "fanout")
FANOUT_MODE = os.environ.get("FANOUT_MODE", "routing")
FANOUT_SECRET = os.environ.get("FANOUT_SECRET") or None
# where browsers open their websocket (a node, or the load balancer in front of the nodes)
PUSH_WEBSOCKET_URL = os.environ.get("PUSH_WEBSOCKET_URL", "ws://127.0.0.1:8765/")

# the key connection tokens are signed with: the same value in the nodes' environment (chat_node.py)
PUSH_TOKEN_KEY = os.environ.get("PUSH_TOKEN_KEY", "")
if not PUSH_TOKEN_KEY:
    raise ImproperlyConfigured("set PUSH_TOKEN_KEY (the token key shared with the fanout nodes)")
PUSH_TOKEN_TTL = int(os.environ.get("PUSH_TOKEN_TTL", "3600"))

# Celery (pushsite/celery.py reads the CELERY_* names): the broker is Redis, tasks go to one queue
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", "push")
CELERY_TASK_IGNORE_RESULT = True  # the tasks push to websockets; nobody waits for a result
if os.environ.get("CELERY_KEY_PREFIX"):  # several projects (or test runs) sharing one Redis database
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": os.environ["CELERY_KEY_PREFIX"]}

"""The Celery app: ``celery -A pushsite worker`` (run from examples/django/)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")

app = Celery("pushsite")
app.config_from_object("django.conf:settings", namespace="CELERY")  # the CELERY_* settings
app.autodiscover_tasks()  # push/tasks.py

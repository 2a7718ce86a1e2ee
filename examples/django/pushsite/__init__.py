# Load the Celery app with Django, so that @shared_task (push/tasks.py) binds to it and .delay() in a view
# sends to its broker.
from .celery import app as celery_app

__all__ = ["celery_app"]

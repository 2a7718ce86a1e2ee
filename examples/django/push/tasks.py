from celery import shared_task

from .realtime import util


@shared_task
def broadcast(text: str) -> int:
    """Push an announcement to every connected client of every node; the number reached."""
    return util.send_to_all({"type": "announcement", "text": text}, ack=True)

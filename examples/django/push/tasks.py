from celery import shared_task
from django.db import transaction

from fanout.django import outbox


@shared_task
def broadcast(text: str) -> None:
    """Push an announcement to every connected client of every node, through the outbox: a task that
    fails before its commit pushes nothing, and one retried after it pushes again only what it commits."""
    with transaction.atomic():
        outbox.send_to_all({"type": "announcement", "text": text})

import re

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from fanout import tokens
from fanout.django import outbox

from .tasks import broadcast

USER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def index(request: HttpRequest) -> HttpResponse:
    """The page: log in, then it opens a websocket to a node with a token from /token."""
    return render(request, "push/index.html", {"user": request.session.get("user")})


@require_POST
def login(request: HttpRequest) -> HttpResponse:
    """A stub login (your project has a real one): remember the user in the session."""
    user = request.POST.get("user", "")
    if not USER.fullmatch(user):
        return JsonResponse({"error": "user: 1-64 letters, digits, _ . -"}, status=400)
    request.session["user"] = user
    return JsonResponse({"user": user})


def token(request: HttpRequest) -> HttpResponse:
    """A connection token for the logged-in user; the node's on_connect checks it (chat_node.py)."""
    user = request.session.get("user")  # with django.contrib.auth: request.user.get_username()
    if not user:
        return JsonResponse({"error": "log in first"}, status=403)
    signed = tokens.issue(settings.PUSH_TOKEN_KEY, user, ttl=settings.PUSH_TOKEN_TTL)
    return JsonResponse({"token": signed, "url": settings.PUSH_WEBSOCKET_URL})


@require_POST
def notify(request: HttpRequest, user: str) -> HttpResponse:
    """Push a notification to every open tab of ``user``, on whichever nodes they are."""
    sender = request.session.get("user")
    if not sender:
        return JsonResponse({"error": "log in first"}, status=403)
    message = {"type": "notification", "from": sender, "text": request.POST.get("text", "")}
    with transaction.atomic():  # with the view's own writes: pushed if they commit, never if they roll back
        outbox.send_by_flag(user, message)  # a row in this transaction; the relay publishes it after COMMIT
    return JsonResponse({"queued": True}, status=202)


@require_POST
def announce(request: HttpRequest) -> HttpResponse:
    """Hand a broadcast to a Celery worker; the view answers at once."""
    if not request.session.get("user"):
        return JsonResponse({"error": "log in first"}, status=403)
    broadcast.delay(request.POST.get("text", ""))
    return JsonResponse({"queued": True}, status=202)

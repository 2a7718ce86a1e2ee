"""The node application of the Django example: it admits only clients with a token that Django issued.

The Django view ``GET /token`` (push/views.py) signs a token for the logged-in user with ``PUSH_TOKEN_KEY``;
the browser connects to ``ws://<node>/?token=<token>``; this hook checks it before the websocket upgrade
and binds the connection to the user (its flag), so ``send_by_flag(user, ...)`` reaches every tab of that
user on every node. Run it from examples/django/::

    PUSH_TOKEN_KEY=... FANOUT_URL=redis://127.0.0.1:6379/0 python -m fanout_node --app chat_node:app
"""

import os

from fanout import Admit, Reject, tokens

KEY = os.environ["PUSH_TOKEN_KEY"]  # the same key as Django's settings.PUSH_TOKEN_KEY


class Push:
    async def on_connect(self, request):  # before the upgrade: a Reject is an HTTP error, no websocket
        try:
            claims = tokens.verify(KEY, request.query.get("token", ""))
        except tokens.InvalidToken as exc:  # missing, forged (another key), expired
            raise Reject(401, str(exc)) from None
        return Admit(flag=claims["sub"], session={"user": claims["sub"]})


app = Push

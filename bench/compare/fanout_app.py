"""The fanout node application of ``bench/compare.py``: admits every client into the group of its query.

``ws://127.0.0.1:PORT/?group=g7`` is admitted as a guest in group ``g7``; nothing else happens on the node
(no hooks run per message), so what is measured is the node's delivery path.
"""

from __future__ import annotations

from fanout import Admit, ConnectRequest, Reject


class CompareApp:
    async def on_connect(self, request: ConnectRequest) -> Admit:
        group = request.query.get("group")
        if not group:
            raise Reject(400, "no group in the query string")
        return Admit(groups=[group])


app = CompareApp()

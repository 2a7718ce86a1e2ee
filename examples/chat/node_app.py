"""The demo chat's node side when a worker runs the chat: the node only admits clients (signed tokens,
as the demo does) and holds their connections; what they say goes to the workers.

Run a node with it::

    FANOUT_URL=redis://127.0.0.1:6379/0 FANOUT_EVENTS=open,message,close \\
        fanout-node --app examples.chat.node_app:app
"""

try:
    from fanout_node.app import DemoChat  # installed: pip install "fanout[node]"
except ImportError:  # a checkout that is not installed, run as python -m node
    from node.app import DemoChat


class Admission(DemoChat):
    """The demo's token admission (``on_connect``) and token endpoint; no in-process chat."""

    on_open = None  # the worker greets (on_open there)
    on_message = None  # messages go to the worker tier (FANOUT_EVENTS), not to a hook here


app = Admission

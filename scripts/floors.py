"""Prints ``name==floor`` for each of fanout's runtime dependencies: the oldest release its ``>=`` admits.

scripts/test.sh --lowest installs these over the lock, so the suite runs against the floors pyproject.toml
promises users (a floor that is too low is found here, not by a user on an old redis-py).
"""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
optional = project["optional-dependencies"]
runtime = [
    *project["dependencies"],
    *optional["redis"],
    *optional["amqp"],
    *optional["node"],
    *optional["outbox"],
]
for requirement in runtime:
    found = re.match(r"^([A-Za-z0-9_.-]+(?:\[[^\]]*\])?)\s*>=\s*([^,;\s]+)", requirement)
    if found:
        print(f"{found[1]}=={found[2]}")

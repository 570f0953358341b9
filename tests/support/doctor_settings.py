"""The test project's settings plus what the doctor's pooler findings read (tests/integration/test_doctor_sockets.py).

DOCTOR_PG_OPTIONS               JSON merged into DATABASES["default"]["OPTIONS"], e.g.
                                {"server_side_binding": true, "prepare_threshold": 5}
DISABLE_SERVER_SIDE_CURSORS     "1" sets it on the default database
"""

from __future__ import annotations

import json
import os

from tests.project.settings import *  # noqa: F403
from tests.project.settings import DATABASES

DATABASES["default"]["OPTIONS"].update(json.loads(os.environ.get("DOCTOR_PG_OPTIONS") or "{}"))
if os.environ.get("DISABLE_SERVER_SIDE_CURSORS") == "1":
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True

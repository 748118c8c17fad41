"""Skip markers the test modules share (kept out of ``nodeproc``, which the bench scripts
import without pytest)."""

from __future__ import annotations

import pytest
from nodeproc import DCMTK

#: Skips a test, or a module (``pytestmark = needs_dcmtk``), on a machine without Debian's
#: dcmtk (storescu, storescp and echoscu come in one package).
needs_dcmtk = pytest.mark.skipif(not (DCMTK / "storescu").exists(),
                                 reason="dcmtk not installed (apt-get install dcmtk)")

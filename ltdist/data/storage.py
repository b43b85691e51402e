"""Moved to :mod:`ltdist.storage` (every part of ltdist uses it, not only data).

``from ltdist.data import storage`` keeps working and is the same module object, so a test or
user that patches ``storage.open_read`` through the old path patches what the loader calls.
"""

import sys

from ltdist import storage

sys.modules[__name__] = storage

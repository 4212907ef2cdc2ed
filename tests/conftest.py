import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import agvm._compat  # noqa: E402

agvm._compat.apply()  # the torchvision shim must be in place before any test imports timm / mmdet

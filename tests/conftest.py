# torch_xla must be imported before tensorflow in any process (the reverse order aborts with an
# LLVM option clash), so import it first, before any test module pulls in the TFRecord / TFDS readers (shards.py).
import os
import sys

os.environ.setdefault("PJRT_DEVICE", "CPU")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_xla  # noqa: E402,F401

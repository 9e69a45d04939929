# torch_xla must be imported before tensorflow in any process (the reverse order aborts with an
# LLVM option clash), so import it first, before any test module pulls in the TFRecord / TFDS
# readers (shards.py).
import os

os.environ.setdefault("PJRT_DEVICE", "CPU")

import demo_data  # noqa: E402 - after PJRT_DEVICE is set
import pytest  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402,F401
from runs import tiny_demo_args, train  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models on 2 shared cores only meet contention in a second thread, and training with one thread
    sums in one order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """The embedded demo dataset (launch/demo_data.py), small: 512 training pairs in 4 webdataset
    shards, 72 held-out images in 36 classes."""
    return demo_data.make_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_train=512, n_val=72, shard_size=128)


@pytest.fixture(scope="session")
def uninterrupted(demo_small, tmp_path_factory):
    """Both demo stages (8 pre-train steps at 32 px, 4 masked fine-tune steps at 64 px) in one
    command: the reference that interrupted and resumed runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("full")
    train(tiny_demo_args(demo_small, out))
    return out

"""Test-session settings: the backend timings that ``backend="auto"`` reads are kept in a
temporary cache, so a developer's recorded timings never change what the tests pick, and the
tests never write to the developer's cache. Compiled rules are not kept as packages (each would
be built again in every fresh session's cache, at about the cost of a compile, where
``torch.compile`` finds Inductor's own caches warm): ``test_packages`` turns them on where it
tests them."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_timing_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPILEDOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("COMPILEDOPT_PACKAGES", "off")
        yield


@pytest.fixture
def host_reads(monkeypatch):
    """A list that records every read of a tensor's value into Python (``bool``, ``item``,
    ``tolist``, ``float``, ``int``, ``index``): each is a host synchronisation on a device.
    Step counts, 0-d int64 tensors kept on the CPU as torch.optim keeps them, never wait on a
    device and are not recorded."""
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            if not (self.dtype == torch.int64 and self.dim() == 0 and self.device.type == "cpu"):
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.fixture
def foreach_copies(monkeypatch):
    """A list that records the length of every ``torch._foreach_copy_`` call: how many tensors
    a multi-tensor step copies into its stacks."""
    copies = []
    original = torch._foreach_copy_

    def counted(dst, src, **kwargs):
        copies.append(len(dst))
        return original(dst, src, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", counted)
    return copies


@pytest.fixture(autouse=True)
def torch_threads():
    """Each test starts with the session's torch thread count: a benchmark run in-process sets
    its own (``torch.set_num_threads``), and results recorded at one count (reductions split
    across threads) differ in the last bits at another."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

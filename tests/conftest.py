import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def drawn_batches(monkeypatch):
    """The sizes of the training batches tensors data streams hand out, in order (an
    independent count of the examples a run drew)."""
    from selfmod.data.streams import IndexedBatches

    drawn, next_batch = [], IndexedBatches.next

    def counted(self, batch_size):
        x, y = next_batch(self, batch_size)
        drawn.append(len(y))
        return x, y

    monkeypatch.setattr(IndexedBatches, "next", counted)
    return drawn


def _worktree_first_on_pythonpath() -> None:
    """Subprocesses (``python -m selfmod.cli``) import this checkout, whatever their cwd."""
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if paths[:1] != [root]:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


_worktree_first_on_pythonpath()

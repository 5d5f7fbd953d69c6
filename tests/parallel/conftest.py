"""Every file here runs on 2 ranks (scripts/test.sh): under mpirun, and under horovodrun --gloo
where the file says ``# gloo: yes``. All ranks run the same tests in the same order."""

import shutil
import tempfile
from pathlib import Path

import pytest
from helpers.corpus import make_corpus

from hvdllm import comm
from hvdllm.data.prepare import PrepareOptions, run_prepare


@pytest.fixture(scope="session", autouse=True)
def horovod():
    comm.init(threads=1)
    assert comm.size() == 2, "tests/parallel must run on 2 ranks (see scripts/test.sh)"
    import horovod.torch as hvd

    return hvd


@pytest.fixture(scope="module")
def shared_dir(horovod):
    """A folder both ranks see (rank 0 makes it, and removes it once both are done with it)."""
    path = tempfile.mkdtemp(prefix="hvdllm-par-") if horovod.rank() == 0 else None
    path = Path(horovod.broadcast_object(path, root_rank=0, name="shared_dir"))
    yield path
    horovod.barrier()  # rank 1 may still be reading files in it
    if horovod.rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def data(shared_dir, horovod):
    if horovod.rank() == 0:
        make_corpus(shared_dir / "corpus", files=10, docs_per_jsonl=20)
    horovod.barrier()
    run_prepare(PrepareOptions(out=str(shared_dir / "data"), inputs=[str(shared_dir / "corpus")],
                               tokenizer="byte", seq_len=32, val_fraction=0.15, min_chars=16))
    return shared_dir / "data"

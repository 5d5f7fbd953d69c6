"""Every file here runs on 2 ranks (scripts/test.sh): under mpirun, and under horovodrun --gloo
where the file says ``# gloo: yes``. All ranks run the same tests in the same order."""

import pytest

from hvdllm import comm


@pytest.fixture(scope="session", autouse=True)
def horovod():
    comm.init(threads=1)
    assert comm.size() == 2, "tests/parallel must run on 2 ranks (see scripts/test.sh)"
    import horovod.torch as hvd

    return hvd

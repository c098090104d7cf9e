"""Fixtures: one random Hugging Face Llama checkpoint per variant; one thread for modules of many tiny ops."""
import pytest
import torch

from tests.decoders.hf_llama import VARIANTS, make_hf_llama


@pytest.fixture(params=list(VARIANTS), scope="module")
def hf_llama(request, tmp_path_factory):
    """(variant name, checkpoint dir, transformers model) for each Llama variant."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_hf_llama(path, **VARIANTS[request.param])


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny ops: on a busy 2-core machine, thread hand-offs cost more than the work (a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Fixtures: one random Hugging Face Llama checkpoint per variant."""
import pytest

from tests.decoders.hf_llama import VARIANTS, make_hf_llama


@pytest.fixture(params=list(VARIANTS), scope="module")
def hf_llama(request, tmp_path_factory):
    """(variant name, checkpoint dir, transformers model) for each Llama variant."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_hf_llama(path, **VARIANTS[request.param])

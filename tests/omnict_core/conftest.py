"""Fixtures of the omnict_core tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on the shared 2-core machine two spinning OpenMP threads
    per process make them ~5x slower under load; restored after each module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """The session's tiny phantom VQA data (``test_data.build_tiny_vqa``)."""
    from tests.omnict_core.test_data import build_tiny_vqa

    return build_tiny_vqa(tmp_path_factory)


@pytest.fixture(scope="module")
def random_model_dir(vqa_dir, tmp_path_factory):
    """A saved random-init ``tiny`` OmniCT on that data's tokenizer (torch seed 0)."""
    from omnict_core.modeling_omnict import build_model, save_omnict
    from omnict_core.tokenization_omnict import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(vqa_dir / "tokenizer"))
    return save_omnict(build_model("tiny", tokenizer), tokenizer, tmp_path_factory.mktemp("random-model") / "model")

"""The serve tests' checkpoint: a tiny seeded GPT-2 saved with transformers, with a byte-level BPE
tokenizer beside it (made once per session)."""
import pytest
from hf_reference import save_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve"), seed=23)

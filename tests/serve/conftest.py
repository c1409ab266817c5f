"""The serve tests' checkpoint: a tiny seeded GPT-2 saved with transformers, with a byte-level BPE
tokenizer beside it (made once per session)."""
import pytest
from hf_reference import byte_level_tokenizer, hf_model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    hf_model(seed=23, n_layer=2, n_embd=64, n_head=4).save_pretrained(d)
    byte_level_tokenizer().save(str(d / "tokenizer.json"))
    return d

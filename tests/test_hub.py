"""push_to_hub goes through huggingface_hub's real HfApi; only the server is faked: a subclass
that records the commit instead of sending it. The pushed files must be exactly the files
save_pretrained writes (plus the model card README.md that push_to_hub adds)."""

import hashlib
import json
import struct
from pathlib import Path

import pytest
import transformers.utils.hub as hf_hub_utils
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM

from optimum_lcqat import LCQATConfig


class RecordingHfApi(HfApi):
    """HfApi with the network calls replaced by a recorder (no Hub server exists here)."""

    def __init__(self):
        super().__init__(library_name="transformers")
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": files})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message=commit_message or "",
            commit_description="", oid="0" * 40,
        )


@pytest.fixture
def fake_hub(monkeypatch):
    api = RecordingHfApi()
    monkeypatch.setattr(hf_hub_utils, "_hf_api", api)

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README.md on the (fake) Hub yet")

    monkeypatch.setattr(hf_hub_utils.ModelCard, "load", no_remote_card)
    return api


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def content(name: str, b: bytes):
    """What a file holds. A safetensors header is JSON whose key order is not fixed (safetensors
    writes its metadata from a hash map, so two saves in one process may order it differently):
    compare the parsed header and the tensor bytes; every other file byte for byte."""
    if name.endswith(".safetensors"):
        n = struct.unpack("<Q", b[:8])[0]
        return json.loads(b[8 : 8 + n]), digest(b[8 + n :])
    return digest(b)


def test_push_to_hub_uploads_exactly_the_saved_files(tiny_fp_dirs, tmp_path, fake_hub):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["qwen2"], quantization_config=LCQATConfig())
    model.save_pretrained(tmp_path / "saved")
    saved = {p.name: content(p.name, p.read_bytes()) for p in (tmp_path / "saved").iterdir()}

    model.push_to_hub("me/tiny-qwen2-lcqat")
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo_id"] == "me/tiny-qwen2-lcqat"
    pushed = {k: content(k, v) for k, v in commit["files"].items()}
    card = pushed.pop("README.md", None)
    assert card is not None
    assert pushed == saved

    # and what was pushed loads as the same lcqat model
    dl = tmp_path / "downloaded"
    dl.mkdir()
    for name, data in commit["files"].items():
        (dl / name).write_bytes(data)
    again = AutoModelForCausalLM.from_pretrained(dl)
    assert again.config.quantization_config.quant_method == "lcqat"

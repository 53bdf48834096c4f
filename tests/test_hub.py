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


def test_model_card_is_huggingface_hub_metadata_and_the_checkpoints_figures(tiny_fp_dirs, tmp_path):
    from huggingface_hub import ModelCard

    from optimum_lcqat.hub import checkpoint_info, write_model_card

    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["qwen2"], quantization_config=LCQATConfig())
    ckpt = tmp_path / "tiny-lcqat"
    model.save_pretrained(ckpt)
    path = write_model_card(ckpt, base_model="org/tiny-qwen2", metrics={"held-out perplexity": "12.34"})
    card = ModelCard.load(path)  # the Hub's own parser reads the metadata back
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "org/tiny-qwen2"
    assert {"optimum-lcqat", "lcqat", "2-bit", "quantized"} <= set(card.data.tags)
    info = checkpoint_info(ckpt)
    assert f"| converted linears | {info['converted_layers']} ({info['converted_weights']:,} weights) |" in card.text
    assert f"| bits per weight (converted linears) | {info['bits_per_weight_converted']:.3f} |" in card.text
    assert "| held-out perplexity | 12.34 |" in card.text and "pip install optimum-lcqat" in card.text
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_save_atomically_replaces_only_with_a_complete_copy(tmp_path):
    from optimum_lcqat.hub import save_atomically

    out = tmp_path / "out"
    save_atomically(out, lambda d: (d / "weights").write_text("old"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_atomically(out, lambda d: (d / "weights").write_text("new"))

    def fails(d):
        (d / "weights").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically(out, fails, overwrite=True)
    assert (out / "weights").read_text() == "old"
    save_atomically(out, lambda d: (d / "other").write_text("new"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copy left beside it

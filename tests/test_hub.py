"""Models by Hugging Face Hub id: a Hub cache filled by huggingface_hub's own code (from tests/hub_server.py's
stand-in for the Hub), then read offline by id, revision and commit, as `paged` runs for a user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import openai
import pytest
import torch
from huggingface_hub import snapshot_download

from hub_server import FakeHub, folder_files, serving
from models_factory import save_tiny_model, word_tokenizer
from paged.config import EngineConfig
from paged.errors import UserError
from paged.model_source import localized, resolve_model, source_of
from paged.models.registry import model_class
from server.conftest import free_port, start_server, stop_server

REPO = "paged-test/tiny-llama"
GGUF_REPO = "paged-test/SmolLM2-GGUF"
PROMPT = "w5 w6 w7 w8"
NEW_TOKENS = 6


def greedy(model: torch.nn.Module) -> list[str]:
    """The reference: transformers' forward pass, argmax after argmax."""
    ids = word_tokenizer()(PROMPT)["input_ids"]
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return word_tokenizer().convert_ids_to_tokens(ids[-NEW_TOKENS:])


class Hub:
    def __init__(self, hub: FakeHub, endpoint: str, main: str, v1: str, references: dict[str, list[str]]) -> None:
        self.fake, self.endpoint, self.main, self.v1, self.references = hub, endpoint, main, v1, references


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: str) -> Iterator[Hub]:
    """Two commits of a tiny Llama (main, and the tag v1 with other weights) beside a file paged must not fetch;
    and a GGUF repository holding SmolLM2's Q4_1 file and a second quantization."""
    tmp = tmp_path_factory.mktemp("hub-models")
    fake = FakeHub()
    repo = fake.repo(REPO)
    references = {}
    for seed, ref in ((0, "main"), (1, "v1")):
        references[ref] = greedy(save_tiny_model("llama", tmp / ref, seed=seed))
    assert references["main"] != references["v1"]
    main = repo.commit({**folder_files(tmp / "main"), "original/consolidated.pth": b"not read by paged"}, "main")
    v1 = repo.commit(folder_files(tmp / "v1"), "v1")
    fake.repo(GGUF_REPO).commit({"README.md": b"# SmolLM2", "SmolLM2-135M-Instruct.Q4_1.gguf":
                                 Path(smollm2_gguf).read_bytes(), "SmolLM2-135M-Instruct.Q8_0.gguf": b"other"}, "main")
    with serving(fake, free_port()) as endpoint:
        yield Hub(fake, endpoint, main, v1, references)


def paged_generate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "paged.cli.main", "generate", PROMPT, "--max-tokens", str(NEW_TOKENS),
               "--ignore-eos", "--dtype", "float32", "--kv-cache-memory", "64MiB", *args]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_a_model_by_hub_id_is_fetched_then_read_offline_by_revision(hub: Hub, tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    online = paged_generate({"HF_HOME": str(home), "HF_ENDPOINT": hub.endpoint}, "--model", REPO)
    assert online.returncode == 0, online.stderr
    assert online.stdout.split() == hub.references["main"]
    fetched = {path.split("/", 2)[2] for path in hub.fake.downloaded if path.startswith(REPO)}
    assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    assert "original/consolidated.pth" not in fetched  # only what paged reads

    # huggingface_hub lays out the tag's snapshot; from here on no request leaves the machine.
    snapshot_download(REPO, revision="v1", cache_dir=home / "hub", endpoint=hub.endpoint)
    offline = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    for revision, reference in (("v1", "v1"), (hub.v1, "v1"), (hub.main, "main")):
        result = paged_generate(offline, "--model", REPO, "--revision", revision)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == hub.references[reference], revision


def test_paged_serve_answers_as_the_hub_id_from_its_own_download_dir(hub: Hub, tmp_path: Path) -> None:
    own = tmp_path / "models"
    snapshot_download(REPO, cache_dir=own, endpoint=hub.endpoint)
    env = {"HF_HOME": str(tmp_path / "empty-home"), "HF_HUB_OFFLINE": "1"}
    server = start_server(REPO, tmp_path / "server.log", "--download-dir", str(own), "--tokenizer", REPO, env=env)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        assert [model.id for model in client.models.list()] == [REPO]
        reply = client.completions.create(model=REPO, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].text.split() == hub.references["main"]
    finally:
        stop_server(server)

    missing = paged_generate(env, "--model", REPO)  # not in HF_HOME's cache, and offline
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"paged: error: cannot fetch model {REPO} from the Hugging Face Hub" in missing.stderr
    assert "HF_HUB_OFFLINE" in missing.stderr


@pytest.fixture(scope="module")
def gguf_cache(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding GGUF_REPO's Q4_1 file (one for the module: the GGUF's config is converted once)."""
    cache = tmp_path_factory.mktemp("gguf-cache")
    snapshot_download(GGUF_REPO, cache_dir=cache, endpoint=hub.endpoint, allow_patterns=["*Q4_1.gguf"])
    return cache


@pytest.fixture
def offline_cache(gguf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """gguf_cache with huggingface_hub offline (what HF_HUB_OFFLINE=1 sets when it is imported)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return gguf_cache


@pytest.mark.parametrize("named", [dict(model=f"{GGUF_REPO}:SmolLM2-135M-Instruct.Q4_1.gguf"),
                                   dict(model=f"{GGUF_REPO}:q4_1"), dict(model=f"{GGUF_REPO}:Q4_1"),
                                   dict(model=GGUF_REPO, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")])
def test_one_gguf_file_of_a_repository(offline_cache: Path, smollm2_gguf: str, named: dict) -> None:
    config = EngineConfig(**named, download_dir=str(offline_cache))
    local = localized(config)
    assert Path(local.model).read_bytes() == Path(smollm2_gguf).read_bytes()
    assert Path(local.model).is_relative_to(offline_cache) and local.gguf_file is None
    assert localized(local) == local  # the processes a server starts find a local path: nothing is fetched again
    source = source_of(config)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.hf_config.num_hidden_layers == 30


def test_gguf_names_that_match_no_single_file(offline_cache: Path, hub: Hub) -> None:
    with pytest.raises(UserError, match="Q5_K_M: expected one matching .gguf file, found none"):
        localized(EngineConfig(model=f"{GGUF_REPO}:Q5_K_M", download_dir=str(offline_cache)))
    with pytest.raises(UserError, match="two GGUF files named"):
        localized(EngineConfig(model=f"{GGUF_REPO}:Q4_1", gguf_file="other.gguf", download_dir=str(offline_cache)))
    with pytest.raises(UserError, match="--load-format safetensors, but .* names a GGUF file"):
        localized(EngineConfig(model=f"{GGUF_REPO}:Q4_1", load_format="safetensors", download_dir=str(offline_cache)))
    assert not any("Q8_0" in path for path in hub.fake.downloaded)  # never fetched: only the file named is


def test_load_format_picks_the_reader(tmp_path: Path, smollm2_gguf: str) -> None:
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    shutil.copy(smollm2_gguf, folder / "model.gguf")
    assert resolve_model(str(folder), load_format="gguf").gguf_file == "model.gguf"
    with pytest.raises(UserError, match="--load-format safetensors, but .* is a GGUF file"):
        resolve_model(smollm2_gguf, load_format="safetensors")
    (folder / "second.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="holds 2 .gguf files .*--gguf-file"):
        resolve_model(str(folder), load_format="gguf")
    local = localized(EngineConfig(model=str(folder), gguf_file="model.gguf"))
    assert local.model == str(folder / "model.gguf") and local.gguf_file is None


REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny-remote"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''


def test_trust_remote_code_loads_the_models_config_class(tmp_path: Path) -> None:
    """The config class comes from the model's own file; its architecture is still not one paged runs."""
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "config.json").write_text('{"model_type": "tiny-remote", "width": 3, "architectures": '
                                        '["TinyRemoteForCausalLM"], "auto_map": {"AutoConfig": '
                                        '"configuration_tiny.TinyRemoteConfig"}}')
    with pytest.raises(UserError, match="cannot load the config"):
        resolve_model(str(folder))
    config = resolve_model(str(folder), trust_remote_code=True).hf_config
    assert type(config).__name__ == "TinyRemoteConfig" and config.width == 3
    with pytest.raises(ValueError, match=r"TinyRemoteForCausalLM.* is not supported; supported: .*LlamaForCausalLM"):
        model_class(config)

"""`leanserve serve --load-format dummy`: a directory with config.json and a tokenizer but no weight
files serves (random weights), as the serving benchmark needs for full-size shapes."""
from __future__ import annotations

import shutil

import httpx
from server_utils import remote_server


def test_config_only_directory_serves_with_dummy_weights(tmp_path, tiny_llm_dir):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for f in tiny_llm_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, config_only)
    assert not list(config_only.glob("*.safetensors"))

    with remote_server(config_only, "--load-format", "dummy", "--max-model-len", "64") as server:
        # token ids as the prompt, as the benchmark sends them
        r = httpx.post(server.api_url + "/completions", timeout=60, json={
            "model": "config-only", "prompt": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
                                     "prompt_tokens_details": {"cached_tokens": 0}}

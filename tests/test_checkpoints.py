"""checkpoints/ (loading.py, layouts.py, architecture.py, resize.py): every layout saved the way its own project saves it, loaded
with miniclip (given config and config=None), embeddings compared with the reference library's."""
import json

import pytest
import torch
from safetensors.torch import save_file

from miniclip.checkpoints import load_model_and_tokenizer, load_pretrained, save_pretrained
from miniclip.config import ClipConfig, load_model_config
from miniclip.model import MiniClip
from miniclip.tokenizer import BertWordPieceTokenizer, ClipBpeTokenizer

ATOL = 1e-5


def _inputs(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = config.vision_cfg.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    t = config.text_cfg
    input_ids = torch.zeros(batch, t.context_length, dtype=torch.long)
    for i in range(batch):
        n = 5 + 3 * i
        input_ids[i, :n] = torch.randint(1, min(t.vocab_size, 21128) - 2, (n,), generator=g)
        if t.tower == "bert":
            input_ids[i, 0], input_ids[i, n - 1] = 101, 102  # [CLS] ... [SEP]
        else:
            input_ids[i, n - 1] = t.vocab_size - 1  # EOT, the highest id
    return pixel_values, input_ids


def _assert_same_model(a: MiniClip, b: MiniClip):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _random_model(name_or_config, seed=0) -> MiniClip:
    torch.manual_seed(seed)
    return MiniClip(name_or_config).eval()


# --- miniclip's own folder ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet", "tiny-chinese-vit", "tiny-chinese-resnet"])
def test_miniclip_folder_round_trip_is_exact(tmp_path, name):
    model = _random_model(name)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    expected = {"model.safetensors", "model_config.json", "tokenizer_config.json"}
    bert = model.config.text_cfg.tower == "bert"
    assert files == expected | ({"vocab.txt"} if bert else set())
    loaded, tokenizer = load_model_and_tokenizer(tmp_path)
    _assert_same_model(model, loaded)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert not loaded.training and loaded.checkpoint_dir == tmp_path
    assert isinstance(tokenizer, BertWordPieceTokenizer if bert else ClipBpeTokenizer)
    again = MiniClip.from_pretrained(tmp_path)
    _assert_same_model(model, again)


def test_save_pretrained_function_and_tokenizer_argument(tmp_path):
    model = _random_model("tiny-vit")
    tokenizer = ClipBpeTokenizer(context_length=77)
    save_pretrained(model, tmp_path / "out", tokenizer=tokenizer)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == tokenizer.describe()
    assert not list((tmp_path / "out").glob(".*tmp*")), "temporary files left behind"


def test_trainer_output_without_config_is_inferred(tmp_path):
    """The tutorial's Trainer writes model.safetensors with MiniClip's names and no config: shapes decide, and the
    activation is the tutorial's QuickGELU (test_run_checkpoints.py checks its embeddings)."""
    model = _random_model("tiny-vit")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "training_args.bin").write_bytes(b"not read")
    loaded = load_pretrained(tmp_path)
    _assert_same_model(model, loaded)
    assert loaded.config.vision_cfg.head_width == 32  # taken from the shipped tiny-vit config of the same shapes
    assert loaded.load_info.layout == "tutorial" and loaded.config.quick_gelu is True


# --- open_clip family: TinyCLIP, open_clip, OpenAI --------------------------------------------------------------------
def _config_64(resnet: bool, quick_gelu: bool = False) -> ClipConfig:
    """A tiny config in no shipped JSON, with OpenAI's 64-wide heads: config=None must infer it from shapes alone."""
    vision = ({"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None, "head_width": 64} if resnet
              else {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 64})
    return ClipConfig.from_dict({"embed_dim": 48, "quick_gelu": quick_gelu, "vision_cfg": vision,
                                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                                              "layers": 2}}, where="test config")


def _open_clip_model(config: ClipConfig, quick_gelu: bool | None = None):
    import open_clip
    cfg = config.open_clip_cfg()
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    torch.manual_seed(0)
    return open_clip.model.CLIP(**cfg).eval()


def _assert_matches_open_clip(model: MiniClip, reference, config: ClipConfig):
    pixel_values, input_ids = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), reference.encode_image(pixel_values),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids), reference.encode_text(input_ids), atol=ATOL, rtol=0)


OPEN_CLIP_CONFIGS = ["tiny-vit", "tiny-resnet", "vit64", "resnet64"]


def _config_named(name: str) -> ClipConfig:
    return {"vit64": lambda: _config_64(False), "resnet64": lambda: _config_64(True)}.get(
        name, lambda: load_model_config(name))()


@pytest.mark.parametrize("name", OPEN_CLIP_CONFIGS)
@pytest.mark.parametrize("given", [True, False], ids=["config", "config=None"])
def test_tinyclip_release_pt(tmp_path, name, given):
    """TinyCLIP's released .pt: {"state_dict": {"module." + open_clip key}, "epoch", "optimizer"}; GELU."""
    config = _config_named(name)
    reference = _open_clip_model(config, quick_gelu=False)
    optimizer = torch.optim.AdamW(reference.parameters())
    file = tmp_path / "TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt"
    torch.save({"epoch": 25, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()},
                "optimizer": optimizer.state_dict()}, file)
    model = load_pretrained(file, config=config if given else None)
    assert model.load_info.layout == "tinyclip" and model.config.quick_gelu is False
    _assert_matches_open_clip(model, reference, config)


@pytest.mark.parametrize("name", ["tiny-resnet", "vit64"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors", "-train.pt"])
def test_open_clip_state_dict_files(tmp_path, name, suffix, caplog):
    config = _config_named(name)
    reference = _open_clip_model(config)
    file = tmp_path / f"weights{suffix}"
    state = reference.state_dict()
    if suffix == ".safetensors":
        save_file(state, str(file))
    elif suffix == "-train.pt":  # open_clip's training checkpoint (DDP) with its bookkeeping entries
        torch.save({"epoch": 2, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()},
                    "optimizer": {"state": {}, "param_groups": []}}, file)
    else:
        torch.save(state, file)
    _assert_matches_open_clip(load_pretrained(file, config=config), reference, config)
    with caplog.at_level("WARNING"):
        inferred = load_pretrained(file)
    assert inferred.load_info.layout == "open_clip" and inferred.config.quick_gelu is False
    # a bare state dict does not say which activation it was trained with: the GELU assumption is announced
    assert "assuming GELU" in caplog.text and "quick_gelu" in caplog.text
    if name == "tiny-resnet":  # and a shipped config of the same shapes is named
        assert "pass config='tiny-resnet' if it is that model" in caplog.text
    _assert_matches_open_clip(inferred, reference, config)


def _save_open_clip_hub_folder(reference, config: ClipConfig, folder, safetensors: bool):
    """What open_clip's push_to_hf_hub.save_for_hf writes (minus the tokenizer files)."""
    import safetensors.torch
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_config_for_hf
    folder.mkdir()
    set_model_preprocess_cfg(reference, {"size": config.vision_cfg.image_size, "mode": "RGB", "mean": (0.5, 0.5, 0.5),
                                         "std": (0.25, 0.25, 0.25), "interpolation": "bicubic",
                                         "resize_mode": "squash", "fill_color": 0})
    cfg = config.open_clip_cfg()
    cfg["quick_gelu"] = True
    if safetensors:
        safetensors.torch.save_file(reference.state_dict(), str(folder / "open_clip_model.safetensors"))
    else:
        torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    save_config_for_hf(reference, folder / "open_clip_config.json", model_config=cfg)


@pytest.mark.parametrize("name", ["tiny-vit", "resnet64"])
@pytest.mark.parametrize("safetensors", [True, False])
def test_open_clip_hub_folder_carries_its_activation(tmp_path, name, safetensors):
    config = _config_named(name)
    reference = _open_clip_model(config, quick_gelu=True)
    _save_open_clip_hub_folder(reference, config, tmp_path / "hub", safetensors)
    model = load_pretrained(tmp_path / "hub")
    assert model.config.quick_gelu is True  # from open_clip_config.json, not a convention
    assert model.config.preprocess_cfg.mean == (0.5, 0.5, 0.5) and model.config.preprocess_cfg.resize_mode == "squash"
    _assert_matches_open_clip(model, reference, config)


def make_openai_archive(reference, image_size: int, path):
    """An OpenAI-style TorchScript archive: OpenAI's key layout, fp16 weights, and the three metadata entries."""
    import open_clip
    del reference.context_length, reference.vocab_size  # python ints in open_clip; 0-dim buffers in OpenAI's files
    reference.register_buffer("input_resolution", torch.tensor(image_size))
    reference.register_buffer("context_length", torch.tensor(77))
    reference.register_buffer("vocab_size", torch.tensor(49408))
    open_clip.model.convert_weights_to_lp(reference)  # OpenAI ships fp16 linear / conv / projection weights
    torch.jit.script(reference).save(str(path))
    for name in ("input_resolution", "context_length", "vocab_size"):
        delattr(reference, name)
    return reference.float()  # the reference computes in fp32 from the same fp16-rounded values


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet", "vit64", "resnet64"])
@pytest.mark.parametrize("given", [True, False], ids=["config", "config=None"])
def test_openai_torchscript_archive(tmp_path, name, given):
    config = _config_named(name)
    reference = _open_clip_model(config, quick_gelu=True)
    reference = make_openai_archive(reference, config.vision_cfg.image_size, tmp_path / "ViT-B-32.pt")
    quick = ClipConfig.from_dict({**config.to_dict(), "quick_gelu": True})
    model = load_pretrained(tmp_path / "ViT-B-32.pt", config=quick if given else None)
    assert model.load_info.layout == "openai" and model.config.quick_gelu is True
    assert {"input_resolution", "context_length", "vocab_size"} <= set(model.load_info.ignored)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_matches_open_clip(model, reference, config)


def test_openai_state_dict_with_int_metadata(tmp_path):
    """The same entries as plain ints (a state dict saved from OpenAI's code) are ignored too."""
    config = _config_named("vit64")
    reference = _open_clip_model(config, quick_gelu=True)
    state = dict(reference.state_dict(), input_resolution=64, context_length=77, vocab_size=49408)
    torch.save(state, tmp_path / "openai.pt")
    model = load_pretrained(tmp_path / "openai.pt")
    assert model.load_info.layout == "openai" and model.config.quick_gelu is True
    _assert_matches_open_clip(model, reference, config)


# --- Chinese-CLIP's own .pt ---------------------------------------------------------------------------------------------
def _chinese_config_64(resnet: bool) -> ClipConfig:
    """BERT with 64-wide heads, in no shipped JSON: config=None must infer every BERT size from shapes."""
    data = _config_64(resnet, quick_gelu=True).to_dict()
    data["text_cfg"] = {"tower": "bert", "context_length": 52, "vocab_size": 21128, "width": 128, "heads": 2,
                        "layers": 2, "intermediate_size": 256, "max_position_embeddings": 512, "type_vocab_size": 2}
    data["preprocess_cfg"]["resize_mode"] = "squash"
    return ClipConfig.from_dict(data, where="test config")


@pytest.mark.parametrize("name", ["tiny-chinese-resnet", "bert64-vit", "bert64-resnet"])
@pytest.mark.parametrize("given", [True, False], ids=["config", "config=None"])
def test_cn_clip_training_checkpoint(tmp_path, name, given):
    """cn_clip's training script saves {"epoch", "step", "name", "state_dict": {"module." + key}, "optimizer"}."""
    from conftest import cn_clip_reference
    config = {"bert64-vit": lambda: _chinese_config_64(False), "bert64-resnet": lambda: _chinese_config_64(True)}.get(
        name, lambda: load_model_config(name))()
    reference = cn_clip_reference(config)
    state = {"module." + k: v for k, v in reference.state_dict().items()}
    width = config.text_cfg.width
    state.update({"module.bert.pooler.dense.weight": torch.randn(width, width),  # released files keep the pooler
                  "module.bert.pooler.dense.bias": torch.randn(width)})
    optimizer = torch.optim.AdamW(reference.parameters())
    torch.save({"epoch": 3, "step": 99, "name": "run", "state_dict": state, "optimizer": optimizer.state_dict()},
               tmp_path / "epoch_latest.pt")
    model = load_pretrained(tmp_path / "epoch_latest.pt", config=config if given else None)
    assert model.load_info.layout == "cn_clip"
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(model.load_info.ignored)
    assert model.config.quick_gelu and model.config.text_cfg.context_length == 52
    assert model.config.preprocess_cfg.resize_mode == "squash"
    pixel_values, input_ids = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), reference.encode_image(pixel_values),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids), reference.encode_text(input_ids), atol=ATOL, rtol=0)


# --- position-embedding resize -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [48, 96, 112])
def test_vit_resize_equals_open_clip_resize(tmp_path, image_size):
    """A 64-pixel checkpoint (4x4 grid) loaded at another size equals open_clip's own resize_pos_embed."""
    from open_clip.model import resize_pos_embed
    config = _config_named("vit64")
    reference = _open_clip_model(config)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    model = load_pretrained(tmp_path / "w.pt", config=config, image_size=image_size)
    assert model.config.vision_cfg.image_size == image_size
    assert model.load_info.resized == [f"image position grid 4x4 -> {image_size // 16}x{image_size // 16} "
                                          f"(image_size {image_size})"]
    resized_config = ClipConfig.from_dict({**config.to_dict(), "vision_cfg": {**config.to_dict()["vision_cfg"],
                                                                               "image_size": image_size}})
    resized = _open_clip_model(resized_config)
    state = reference.state_dict()
    resize_pos_embed(state, resized)
    resized.load_state_dict(state)
    torch.testing.assert_close(model.image_encoder.visual.positional_embedding, state["visual.positional_embedding"],
                               atol=0, rtol=0)
    _assert_matches_open_clip(model, resized, resized_config)
    # config=None + image_size: inferred at 64, resized the same way
    inferred = load_pretrained(tmp_path / "w.pt", image_size=image_size)
    _assert_same_model(model, inferred)


def test_resnet_attention_pool_grid_resized_like_open_clip(tmp_path):
    """open_clip resizes only ViT grids; the ResNet attention-pool grid (1 + g*g tokens) gets the same math."""
    from types import SimpleNamespace
    from open_clip.model import resize_pos_embed
    config = _config_named("resnet64")
    reference = _open_clip_model(config)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    model = load_pretrained(tmp_path / "w.pt", image_size=96)  # 2x2 -> 3x3 attention-pool grid
    grid = {"visual.positional_embedding": reference.state_dict()["visual.attnpool.positional_embedding"]}
    resize_pos_embed(grid, SimpleNamespace(visual=SimpleNamespace(grid_size=(3, 3))))
    torch.testing.assert_close(model.image_encoder.visual.attnpool.positional_embedding,
                               grid["visual.positional_embedding"], atol=0, rtol=0)
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 48)


@pytest.mark.parametrize("context_length", [16, 100])
def test_text_context_truncated_or_extended(tmp_path, context_length):
    """Shorter: the first rows, exactly; longer: trained rows kept, the last one repeated. Either way a caption
    that fits gives the reference's embedding (causal attention: later positions cannot change it)."""
    config = _config_named("tiny-vit")
    reference = _open_clip_model(config)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    model = load_pretrained(tmp_path / "w.pt", context_length=context_length)
    pos, trained = model.text_encoder.positional_embedding, reference.positional_embedding
    assert pos.shape[0] == context_length and model.config.text_cfg.context_length == context_length
    kept = min(77, context_length)
    assert torch.equal(pos[:kept], trained[:kept])
    if context_length > 77:
        assert torch.equal(pos[77:], trained[-1:].expand(context_length - 77, -1))
    _, input_ids = _inputs(config)  # captions of 5 and 8 tokens
    ours = torch.zeros(input_ids.shape[0], context_length, dtype=torch.long)
    ours[:, :16] = input_ids[:, :16]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ours), reference.encode_text(input_ids), atol=ATOL, rtol=0)


# --- export ----------------------------------------------------------------------------------------------------------------
def _perturbed(name) -> MiniClip:
    """Random offsets on every parameter (LayerNorms and biases too), so a mis-mapped one cannot hide."""
    model = _random_model(name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet"])
def test_open_clip_export_loads_in_open_clip_and_round_trips(tmp_path, name):
    import open_clip
    model = _perturbed(name)
    model.save_pretrained(tmp_path / "oc", format="open_clip")
    assert {p.name for p in (tmp_path / "oc").iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors"}
    # open_clip 3.3 reads a local hub-style folder through the `local-dir:` schema
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert tuple(reference.visual.preprocess_cfg["mean"]) == model.config.preprocess_cfg.mean
    _assert_matches_open_clip(model, reference.eval(), model.config)
    back = load_pretrained(tmp_path / "oc")
    _assert_same_model(model, back)
    assert back.config.to_dict() | {"name": None} == model.config.to_dict() | {"name": None}


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-chinese-vit"])
def test_hf_export_round_trip_is_exact(tmp_path, name):
    from transformers import ChineseCLIPModel, CLIPModel
    model = _perturbed(name)
    model.save_pretrained(tmp_path / "hf", format="hf")
    bert = model.config.text_cfg.tower == "bert"
    hf_class = ChineseCLIPModel if bert else CLIPModel
    hf_model, info = hf_class.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    pixel_values, _ = _inputs(model.config)
    with torch.no_grad():
        theirs = hf_model.eval().get_image_features(pixel_values=pixel_values)
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
        torch.testing.assert_close(model.encode_image(pixel_values), theirs, atol=ATOL, rtol=0)
    back, tokenizer = load_model_and_tokenizer(tmp_path / "hf")
    _assert_same_model(model, back)
    assert back.config.to_dict() | {"name": None} == model.config.to_dict() | {"name": None}
    if bert:  # the vocabulary travels with the folder
        assert (tmp_path / "hf" / "vocab.txt").is_file() and tokenizer.vocab_file == str(tmp_path / "hf" / "vocab.txt")


def test_open_clip_export_refuses_bert_text_tower(tmp_path):
    with pytest.raises(ValueError, match="format='hf'"):
        _random_model("tiny-chinese-vit").save_pretrained(tmp_path, format="open_clip")
    with pytest.raises(ValueError, match=r"format='tflite' is not one of \['miniclip', 'hf', 'open_clip', 'onnx'\]"):
        _random_model("tiny-vit").save_pretrained(tmp_path, format="tflite")


def test_save_is_atomic_and_keeps_the_old_checkpoint_on_failure(tmp_path, monkeypatch):
    """A crash while writing leaves the previous model.safetensors intact and no temporary file behind."""
    import safetensors.torch
    first = _random_model("tiny-vit", seed=1)
    first.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        _random_model("tiny-vit", seed=2).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model_config.json",
                                                           "tokenizer_config.json"]


def test_loaded_model_owns_its_memory(tmp_path):
    """Parameters are fresh tensors, not views of the file: rewriting the file in place (a Trainer saving into the
    folder it loaded from) neither changes them nor crashes (SIGBUS) when they are read."""
    model = _random_model("tiny-vit")
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    open(tmp_path / "model.safetensors", "wb").close()  # truncate in place
    _assert_same_model(model, loaded)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert torch.equal(loaded.text_encoder.attn_mask, model.text_encoder.attn_mask)  # rebuilt, not stored


def test_another_format_saved_over_a_miniclip_folder_is_the_one_read(tmp_path):
    """A miniclip save, then an hf save into the same folder: the folder loads as the hf model, not the old one."""
    _random_model("tiny-vit").save_pretrained(tmp_path)
    newer = _random_model("tiny-vit")
    with torch.no_grad():
        newer.logit_scale.logit_scale.fill_(1.25)
    newer.save_pretrained(tmp_path, format="hf")
    loaded = load_pretrained(tmp_path)
    assert loaded.load_info.layout == "hf_clip"
    assert loaded.state_dict()["logit_scale.logit_scale"].item() == pytest.approx(1.25)

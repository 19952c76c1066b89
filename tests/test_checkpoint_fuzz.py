"""Fuzz test of the loader's refusals: > 200 damaged checkpoints (dropped / extra / renamed keys, transposed or
reshaped tensors, wrong dtypes, non-tensors, truncated / empty / foreign files, pickles that would run code, wrong
configs or formats). Each must raise the documented error naming the file and the problem, copy nothing into a
model, and run no code."""
import io
import pickle
import random
import re
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import miniclip.checkpoints.loading as checkpoints
from miniclip.checkpoints import CheckpointError, load_pretrained
from miniclip.config import ClipConfig

# Small enough that a refusal costs milliseconds; two text layers so that layer-count errors can be provoked.
MICRO = ClipConfig.from_dict({
    "embed_dim": 16, "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 32, "heads": 1, "layers": 2}}, where="micro")
MARKER_NAME = "pickle_ran_code.txt"


class RunsCode:
    """Unpickling this calls open(marker, "w"): it creates a file if, and only if, pickle runs its payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def base_state():
    import open_clip
    torch.manual_seed(0)
    return open_clip.model.CLIP(**MICRO.open_clip_cfg()).state_dict()


@pytest.fixture(autouse=True)
def copies(monkeypatch):
    """Records every copy into a model (the real function still runs): a refused checkpoint must copy nothing."""
    calls = []
    real = checkpoints._copy_into

    def recording(model, state):
        calls.append(len(state))
        return real(model, state)

    monkeypatch.setattr(checkpoints, "_copy_into", recording)
    return calls


def _miniclip_name(key: str) -> str:
    if key.startswith("visual."):
        return "image_encoder." + key
    return "logit_scale.logit_scale" if key == "logit_scale" else "text_encoder." + key


# --- state-dict mutations ---------------------------------------------------------------------------------------------
def _state_cases():
    rng = random.Random(0)
    cases = []
    keys = sorted(k for k in _micro_keys())
    two_d = [k for k, shape in _micro_keys().items() if len(shape) == 2 and shape[0] != shape[1]]
    multi = [k for k, shape in _micro_keys().items() if len(shape) >= 2]
    for key in rng.sample(keys, 24):
        cases.append((f"drop-{key}", lambda s, k=key: s.pop(k), rf"missing from the checkpoint \(1\): "
                                                                 rf"{_miniclip_name(key)}"))
    for i in range(12):
        name = rng.choice(["visual.extra", "transformer.resblocks.9.mlp.c_fc.weight", "junk", "text_model.x"]) + f"{i}"
        cases.append((f"extra-{name}", lambda s, n=name: s.__setitem__(n, torch.zeros(3)),
                      rf"unexpected in the checkpoint \(1\): {name}"))
    for key in rng.sample(keys, 16):
        new = key.replace(".", "_", 1) if rng.random() < 0.5 else key + ".renamed"
        cases.append((f"rename-{key}", lambda s, k=key, n=new: s.__setitem__(n, s.pop(k)),
                      rf"missing from the checkpoint \(1\): {_miniclip_name(key)}.*unexpected.*{re.escape(new)}"))
    for key in two_d:
        cases.append((f"transpose-{key}", lambda s, k=key: s.__setitem__(k, s[k].t().contiguous()),
                      rf"wrong shape \(1\): {_miniclip_name(key)}: checkpoint"))
    for key in rng.sample(multi, min(12, len(multi))):
        cases.append((f"flatten-{key}", lambda s, k=key: s.__setitem__(k, s[k].flatten()),
                      rf"wrong shape \(1\): {_miniclip_name(key)}"))
    for key in rng.sample(keys, 8):
        cases.append((f"unsqueeze-{key}", lambda s, k=key: s.__setitem__(k, s[k].reshape(1, *s[k].shape, 1)),
                      rf"wrong shape \(1\): {_miniclip_name(key)}"))
    for key, dtype in zip(rng.sample(keys, 12), [torch.int64, torch.int32, torch.bool, torch.uint8] * 3):
        cases.append((f"dtype-{dtype}-{key}", lambda s, k=key, d=dtype: s.__setitem__(k, s[k].to(d)),
                      rf"wrong type \(1\): {_miniclip_name(key)}: dtype {dtype}"))
    return cases


_KEYS_CACHE = {}


def _micro_keys() -> dict:
    if not _KEYS_CACHE:
        import open_clip
        with torch.device("meta"):
            model = open_clip.model.CLIP(**MICRO.open_clip_cfg())
        _KEYS_CACHE.update({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return _KEYS_CACHE


STATE_CASES = _state_cases()
STORAGES = ["train.pt", "miniclip.safetensors"]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("case", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_mutated_state_is_refused(tmp_path, base_state, copies, storage, case):
    _, mutate, pattern = case
    state = {k: v.clone() for k, v in base_state.items()}
    mutate(state)
    file = tmp_path / storage
    if storage == "train.pt":  # open_clip / TinyCLIP training checkpoint
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state.items()}}, file)
    else:  # miniclip names, as the tutorial's Trainer writes them (keys not in the model keep their own names)
        renamed = {(_miniclip_name(k) if k in base_state else k): v for k, v in state.items()}
        save_file(renamed, str(file))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(file, config=MICRO)
    message = str(error.value)
    assert str(file) in message and "nothing was loaded" in message
    assert re.search(pattern, message, flags=re.S), message
    assert copies == []


def test_non_tensor_entries_are_refused(tmp_path, base_state, copies):
    for i, value in enumerate(["a string", [1, 2, 3], 7, {"nested": 1}]):
        state = dict(base_state)
        state["visual.proj"] = value
        file = tmp_path / f"nontensor{i}.pt"
        torch.save(state, file)
        with pytest.raises(CheckpointError, match=r"wrong type \(1\): image_encoder.visual.proj: a "):
            load_pretrained(file, config=MICRO)
    assert copies == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_cast_not_refused(tmp_path, base_state, dtype):
    torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in base_state.items()}, tmp_path / "w.pt")
    model = load_pretrained(tmp_path / "w.pt", config=MICRO)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key, value in base_state.items():
        assert torch.equal(model.state_dict()[_miniclip_name(key)], value.to(dtype).float()), key


# --- damaged and foreign files ------------------------------------------------------------------------------------------
def _file_bytes(base_state, tmp_path) -> dict:
    out = {}
    buffer = io.BytesIO()
    torch.save({"state_dict": base_state}, buffer)
    out["pt"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save(base_state, buffer, _use_new_zipfile_serialization=False)
    out["legacy.pt"] = buffer.getvalue()
    save_file(base_state, str(tmp_path / "s.safetensors"))
    out["safetensors"] = (tmp_path / "s.safetensors").read_bytes()
    return out


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.05, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.97, 0.995])
@pytest.mark.parametrize("kind", ["pt", "legacy.pt", "safetensors"])
def test_truncated_files_are_refused(tmp_path, base_state, copies, kind, fraction):
    data = _file_bytes(base_state, tmp_path)[kind]
    file = tmp_path / f"cut.{kind}"
    file.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(CheckpointError) as error:
        load_pretrained(file, config=MICRO)
    assert str(file) in str(error.value)
    assert copies == []


FOREIGN = {
    "empty": b"",
    "text": b"hello, this is not a checkpoint\n" * 20,
    "json": b'{"embed_dim": 512, "vision_cfg": {}}',
    "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "random": bytes(random.Random(1).getrandbits(8) for _ in range(5000)),
    "zeros": bytes(4096),
    "fake-safetensors-header": (30).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape"' + bytes(100),
    "html-error-page": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    "plain-pickle-of-int": pickle.dumps(12345),
    "pickled-list": pickle.dumps([1, 2, 3], protocol=2),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_files_are_refused(tmp_path, copies, name):
    file = tmp_path / f"{name}.pt"
    file.write_bytes(FOREIGN[name])
    with pytest.raises(CheckpointError) as error:
        load_pretrained(file, config=MICRO)
    assert str(file) in str(error.value)
    assert copies == []


def test_zip_that_is_not_a_checkpoint_is_refused(tmp_path, copies):
    file = tmp_path / "archive.pt"
    with zipfile.ZipFile(file, "w") as zf:
        zf.writestr("readme.txt", "not a torch archive")
    with pytest.raises(CheckpointError, match=str(file)):
        load_pretrained(file, config=MICRO)
    assert copies == []


# --- pickles that would run code ----------------------------------------------------------------------------------------
def _payloads(marker):
    evil = RunsCode(marker)
    return {
        "top-level": evil,
        "in-state-dict": {"visual.proj": evil},
        "in-wrapper": {"state_dict": {"logit_scale": torch.tensor(1.0)}, "args": evil},
        "in-list": [torch.zeros(2), evil],
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["top-level", "in-state-dict", "in-wrapper", "in-list"])
def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, copies, legacy, payload):
    marker = tmp_path / MARKER_NAME
    file = tmp_path / "evil.pt"
    torch.save(_payloads(marker)[payload], file, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"allow_unsafe_pickle=True") as error:
        load_pretrained(file, config=MICRO)
    assert str(file) in str(error.value)
    assert not marker.exists(), "the pickle's payload ran"
    assert copies == []


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_raw_pickle_that_runs_code_is_refused(tmp_path, protocol):
    marker = tmp_path / MARKER_NAME
    file = tmp_path / "evil.bin"
    file.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError):
        load_pretrained(file, config=MICRO)
    assert not marker.exists()


def test_the_payload_is_live_when_unsafe_loading_is_allowed(tmp_path):
    """Proof that the refusals above guard something: allowing it does run the payload."""
    marker = tmp_path / MARKER_NAME
    torch.save({"state_dict": {"x": RunsCode(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):  # it is still not a state dict of tensors
        load_pretrained(tmp_path / "evil.pt", config=MICRO, allow_unsafe_pickle=True)
    assert marker.exists()


def test_unsafe_pickle_of_a_real_checkpoint_loads_when_allowed(tmp_path, base_state):
    from argparse import Namespace  # training scripts pickle their args next to the weights: allowed (io.py)
    from fractions import Fraction  # harmless, but not on the allow-list: like any other class, refused
    torch.save({"state_dict": base_state, "args": Namespace(lr=0.1)}, tmp_path / "with_args.pt")
    assert torch.equal(load_pretrained(tmp_path / "with_args.pt", config=MICRO).text_encoder.token_embedding.weight,
                       base_state["token_embedding.weight"])
    torch.save({"state_dict": base_state, "args": Namespace(lr=Fraction(1, 10))}, tmp_path / "with_args.pt")
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle=True"):
        load_pretrained(tmp_path / "with_args.pt", config=MICRO)
    model = load_pretrained(tmp_path / "with_args.pt", config=MICRO, allow_unsafe_pickle=True)
    assert torch.equal(model.text_encoder.token_embedding.weight, base_state["token_embedding.weight"])


# --- wrong config, wrong format ---------------------------------------------------------------------------------------------
def _with(**changes) -> ClipConfig:
    data = MICRO.to_dict()
    for path, value in changes.items():
        section, key = path.split("__")
        data[section][key] = value
    return ClipConfig.from_dict(data)


@pytest.mark.parametrize("config, cause", [
    (_with(text_cfg__layers=1), "the checkpoint has 2 text layers and the config 1"),
    (_with(text_cfg__layers=3), "the checkpoint has 2 text layers and the config 3"),
    (_with(vision_cfg__layers=2), "the checkpoint has 1 vision layers and the config 2"),
    (_with(text_cfg__width=64, text_cfg__heads=2), "text width is 32 in the checkpoint and 64 in the config"),
    (_with(vision_cfg__patch_size=8), "patch size is 16 in the checkpoint and 8 in the config"),
    (_with(text_cfg__vocab_size=400), "vocab size is 300 in the checkpoint and 400 in the config"),
])
def test_wrong_config_names_the_likely_cause(tmp_path, base_state, copies, config, cause):
    torch.save(base_state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path / "w.pt", config=config)
    message = str(error.value)
    assert cause in message and "pass config=None to infer" in message and "layout: open_clip" in message
    assert copies == []


def test_shipped_config_is_suggested(tmp_path, copies):
    import open_clip
    from miniclip.config import load_model_config
    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**load_model_config("tiny-vit").open_clip_cfg()).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="use config 'tiny-vit' or pass config=None to infer it"):
        load_pretrained(tmp_path / "w.pt", config="tiny-resnet")
    assert copies == []


@pytest.mark.parametrize("format, hint", [("cn_clip", "open_clip / OpenAI / TinyCLIP"),
                                          ("miniclip", "open_clip / OpenAI / TinyCLIP"),
                                          ("hf_clip", "Hugging Face CLIPModel state dict without its config.json")])
def test_wrong_format_is_refused_with_a_hint(tmp_path, base_state, copies, format, hint):
    torch.save(base_state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=hint.replace("(", r"\(")):
        load_pretrained(tmp_path / "w.pt", format=format)
    assert copies == []


def test_unknown_format_and_unknown_layout(tmp_path, copies):
    with pytest.raises(ValueError, match=r"format='pickle' is not one of \['auto', 'miniclip'"):
        load_pretrained(tmp_path, format="pickle")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_pretrained(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_pretrained(tmp_path / "missing.pt")
    assert copies == []


def test_hf_state_dict_without_config_json(tmp_path, copies):
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(4),
               "text_model.embeddings.token_embedding.weight": torch.zeros(3, 4)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="Hugging Face CLIPModel state dict without its config.json"):
        load_pretrained(tmp_path / "weights.safetensors")
    assert copies == []


def test_tinyclip_auto_inheritance_checkpoint_is_refused_with_reason(tmp_path, copies):
    """TinyCLIP's pruned checkpoints name their towers _image_encoder / _text_encoder and carry l0-module gates."""
    state = {"_image_encoder.visual.conv1.weight": torch.zeros(8, 3, 32, 32),
             "_image_encoder.visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3 * 64, 768),
             "_text_encoder.token_embedding.weight": torch.zeros(10, 8),
             "_image_encoder.l0_module.hidden_loga": torch.zeros(768),
             "_logit_scale.logit_scale": torch.tensor(4.6)}
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 5},
               tmp_path / "TinyCLIP-auto-ViT-45M-32-Text-18M-LAION400M.pt")
    with pytest.raises(CheckpointError, match="auto-inheritance.*not supported"):
        load_pretrained(tmp_path / "TinyCLIP-auto-ViT-45M-32-Text-18M-LAION400M.pt")
    assert copies == []


def test_case_count():
    """The issue asks for at least 200 mutated checkpoints."""
    n = (len(STATE_CASES) * len(STORAGES) + 4 + 12 * 3 + len(FOREIGN) + 1 + 8 + 4 + 6 + 1 + 3 + 3 + 1 + 1)
    assert n >= 200, n

"""hub.py: known names and repo ids resolved through the real huggingface_hub download code, against a local HTTP
server that serves a folder the way the Hub serves repos (HF_ENDPOINT points at it; no network), and offline."""
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from miniclip.checkpoints import load_pretrained
from miniclip.config import load_model_config
from miniclip.checkpoints.hub import KNOWN, list_known_names, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """Serves `root/<org>/<name>/<file>` at `/<org>/<name>/resolve/<revision>/<file>` with the headers
    huggingface_hub reads (X-Repo-Commit, ETag, Content-Length); 404 + EntryNotFound otherwise."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self, body: bool):
                parts = self.path.split("?")[0].strip("/").split("/")
                file = hub.root.joinpath(*parts[:2], *parts[4:]) if len(parts) > 4 and parts[2] == "resolve" else None
                hub.requests.append((self.command, self.path))
                if file is None or not file.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def repo(self, repo_id: str) -> Path:
        path = self.root / repo_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def file_requests(self):
        return [r for r in self.requests if "/resolve/" in r[1]]


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "remote")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MINICLIP_HUB_DIR", str(tmp_path / "model_hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.server.shutdown()


def _hf_clip_folder(folder: Path, safetensors=True):
    """A real transformers CLIPModel (tiny, random) saved as the Hub holds it."""
    from transformers import CLIPConfig, CLIPModel
    from miniclip.checkpoints.hf_clip import miniclip_config_to_hf_clip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**miniclip_config_to_hf_clip(load_model_config("tiny-vit")))).eval()
    model.save_pretrained(folder)
    if not safetensors:  # how transformers < 4.35 saved it (transformers 5 writes safetensors only)
        from safetensors.torch import load_file
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return model


def _assert_same_as_hf(model, hf_model):
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ours = model.encode_image(pixel_values)
        theirs = hf_model.get_image_features(pixel_values=pixel_values)
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("safetensors", [True, False], ids=["model.safetensors", "pytorch_model.bin"])
def test_tinyclip_name_downloads_the_hub_folder(local_hub, tmp_path, monkeypatch, safetensors):
    name = "TinyCLIP-ViT-8M-16-Text-3M-YFCC15M"
    hf_model = _hf_clip_folder(local_hub.repo(f"wkcn/{name}"), safetensors=safetensors)
    model = load_pretrained(name)
    folder = tmp_path / "model_hub" / name
    weights = "model.safetensors" if safetensors else "pytorch_model.bin"
    assert (folder / "config.json").is_file() and (folder / weights).is_file()
    assert model.load_info.layout == "hf_clip" and Path(model.load_info.file) == folder / weights
    _assert_same_as_hf(model, hf_model)
    # Second time: the files in model_hub/ are used, nothing is requested.
    before = len(local_hub.file_requests())
    load_pretrained(name)
    assert len(local_hub.file_requests()) == before


def test_chinese_clip_name_downloads_cn_clip_pt(local_hub, tmp_path):
    from conftest import cn_clip_reference
    config = load_model_config("tiny-chinese-vit")
    reference = cn_clip_reference(config)
    repo = local_hub.repo("OFA-Sys/chinese-clip-vit-base-patch16")
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               repo / "clip_cn_vit-b-16.pt")
    model = load_pretrained("ChineseCLIP-ViT-B-16")
    assert model.load_info.layout == "cn_clip"
    assert (tmp_path / "model_hub" / "ChineseCLIP-ViT-B-16" / "clip_cn_vit-b-16.pt").is_file()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), reference.encode_image(pixel_values),
                                   atol=1e-5, rtol=0)


def test_openai_name_downloads_open_clip_hub_copy(local_hub, tmp_path):
    """OpenAI names come from open_clip's hub copies (timm/...openai): open_clip_config.json + safetensors."""
    from miniclip.checkpoints import save_pretrained
    from miniclip.model import MiniClip
    config = load_model_config("tiny-vit")
    torch.manual_seed(0)
    original = MiniClip(config).eval()
    save_pretrained(original, local_hub.repo("timm/vit_base_patch32_clip_224.openai"), format="open_clip")
    model = load_pretrained("OpenAI-ViT-B-32")
    assert model.load_info.layout == "open_clip"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.state_dict().items())


def test_any_repo_id_is_fetched_as_a_folder(local_hub, tmp_path):
    hf_model = _hf_clip_folder(local_hub.repo("someone/my-tiny-clip"))
    model = load_pretrained("someone/my-tiny-clip")
    assert (tmp_path / "model_hub" / "someone--my-tiny-clip" / "config.json").is_file()
    _assert_same_as_hf(model, hf_model)


@pytest.mark.parametrize("name", ["TinyCLIP-ViT-40M-32-Text-19M-LAION400M", "TinyCLIP-ResNet-19M-Text-19M-LAION400M",
                                  "ChineseCLIP-RN50", "OpenAI-RN50"])
def test_offline_error_says_which_file_goes_where(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MINICLIP_HUB_DIR", str(tmp_path / "model_hub"))
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained(name)
    message = str(error.value)
    folder = tmp_path / "model_hub" / name
    assert f"place one of these into {folder}/" in message and "offline" in message
    source = KNOWN[name]
    if source.repo_id:
        for group in source.groups:
            assert " + ".join(group) + f" from https://huggingface.co/{source.repo_id}" in message
    if source.url:
        assert source.url in message and source.url.rsplit("/", 1)[1] in message
    expected = {"TinyCLIP-ViT-40M-32-Text-19M-LAION400M": "config.json + model.safetensors from "
                "https://huggingface.co/wkcn/TinyCLIP-ViT-40M-32-Text-19M-LAION400M",
                "TinyCLIP-ResNet-19M-Text-19M-LAION400M": "https://github.com/wkcn/TinyCLIP-model-zoo/releases/"
                "download/checkpoints/TinyCLIP-ResNet-19M-Text-19M-LAION400M.pt",
                "ChineseCLIP-RN50": "clip_cn_rn50.pt from https://huggingface.co/OFA-Sys/chinese-clip-rn50",
                "OpenAI-RN50": "open_clip_config.json + open_clip_model.safetensors from "
                               "https://huggingface.co/timm/resnet50_clip.openai"}[name]
    assert expected in message


def test_hand_placed_release_file_is_used_offline(tmp_path, monkeypatch):
    """The model_hub/README.md recipe: put the TinyCLIP release .pt in model_hub/<NAME>/."""
    import open_clip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MINICLIP_HUB_DIR", str(tmp_path / "model_hub"))
    name = "TinyCLIP-ResNet-19M-Text-19M-LAION400M"
    config = load_model_config("tiny-resnet")
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(**config.open_clip_cfg()).eval()
    (tmp_path / "model_hub" / name).mkdir(parents=True)
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               tmp_path / "model_hub" / name / f"{name}.pt")
    assert resolve(name) == tmp_path / "model_hub" / name / f"{name}.pt"
    model = load_pretrained(name)
    assert model.load_info.layout == "tinyclip" and not model.config.quick_gelu


def test_paths_win_and_unknown_names_list_known_ones(tmp_path):
    assert resolve(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="Known names: .*TinyCLIP-ViT-40M-32-Text-19M-LAION400M"):
        resolve("no-such-model")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):  # a typo, not a hub repo id
        resolve("checkpoints/epoch_3.pt")
    assert "OpenAI-ViT-B-32" in list_known_names() and "ChineseCLIP-ViT-B-16" in list_known_names()

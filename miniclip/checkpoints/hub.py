"""Known checkpoint names -> local files: `model_hub/<NAME>/` first, else a download with huggingface_hub
(`hf_hub_download(..., local_dir=model_hub/<NAME>)`, or the project's release URL where no hub repo exists).

Offline, the error says exactly which files to place in which folder. A plain path (file or folder) is returned as
is, and any `org/name` Hugging Face repo id is fetched as a CLIPModel / ChineseCLIPModel / open_clip folder.
Leaves out on purpose: revisions / private repos (use huggingface_hub yourself and pass the folder).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_DIR = Path(__file__).resolve().parents[2] / "model_hub"  # a checkout's git-ignored model_hub/
TINYCLIP_RELEASES = "https://github.com/wkcn/TinyCLIP-model-zoo/releases/download/checkpoints/"
OPENAI_URLS = "https://openaipublic.azureedge.net/clip/models/"
# Alternatives: any one group of files is a complete checkpoint, tried in order.
HF_FOLDER = (("config.json", "model.safetensors"), ("config.json", "pytorch_model.bin"))
OPEN_CLIP_FOLDER = (("open_clip_config.json", "open_clip_model.safetensors"),
                    ("open_clip_config.json", "open_clip_pytorch_model.bin"))
OPTIONAL_FILES = ("vocab.txt",)  # Chinese-CLIP's BERT vocabulary, when the repo has one


@dataclass(frozen=True)
class Source:
    repo_id: str | None = None  # Hugging Face hub repo
    groups: tuple = HF_FOLDER  # file groups in that repo
    url: str | None = None  # direct download when no hub repo holds the file
    note: str = ""


def _tinyclip(name: str, hf: bool) -> Source:
    # The ViT models are on the hub as CLIPModel folders; CLIPModel has no ResNet tower, so those are release-only.
    return Source(repo_id=f"wkcn/{name}" if hf else None, url=TINYCLIP_RELEASES + name + ".pt")


def _cn_clip(repo: str, file: str) -> Source:
    return Source(repo_id=f"OFA-Sys/{repo}", groups=((file,),), note="Chinese-CLIP's own .pt (cn_clip layout)")


def _openai(repo: str, digest_and_file: str) -> Source:
    return Source(repo_id=f"timm/{repo}", groups=OPEN_CLIP_FOLDER, url=OPENAI_URLS + digest_and_file,
                  note="open_clip's hub copy of OpenAI's weights; the URL is OpenAI's TorchScript original")


KNOWN: dict[str, Source] = {
    **{n: _tinyclip(n, hf=True) for n in (
        "TinyCLIP-ViT-39M-16-Text-19M-YFCC15M", "TinyCLIP-ViT-8M-16-Text-3M-YFCC15M",
        "TinyCLIP-ViT-61M-32-Text-29M-LAION400M", "TinyCLIP-ViT-40M-32-Text-19M-LAION400M")},
    **{n: _tinyclip(n, hf=False) for n in (
        "TinyCLIP-ResNet-30M-Text-29M-LAION400M", "TinyCLIP-ResNet-19M-Text-19M-LAION400M")},
    "ChineseCLIP-ViT-B-16": _cn_clip("chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt"),
    "ChineseCLIP-ViT-L-14": _cn_clip("chinese-clip-vit-large-patch14", "clip_cn_vit-l-14.pt"),
    "ChineseCLIP-ViT-L-14-336": _cn_clip("chinese-clip-vit-large-patch14-336px", "clip_cn_vit-l-14-336.pt"),
    "ChineseCLIP-ViT-H-14": _cn_clip("chinese-clip-vit-huge-patch14", "clip_cn_vit-h-14.pt"),
    "ChineseCLIP-RN50": _cn_clip("chinese-clip-rn50", "clip_cn_rn50.pt"),
    "OpenAI-ViT-B-32": _openai("vit_base_patch32_clip_224.openai",
                               "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    "OpenAI-ViT-B-16": _openai("vit_base_patch16_clip_224.openai",
                               "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"),
    "OpenAI-RN50": _openai("resnet50_clip.openai",
                           "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"),
}


def list_known_names() -> list[str]:
    return sorted(KNOWN)


def hub_dir() -> Path:
    """`$MINICLIP_HUB_DIR`, else the checkout's model_hub/, else (an installed package, where that folder would be
    inside site-packages) the cache: $MINICLIP_CACHE/hub or ~/.cache/miniclip/hub."""
    if os.environ.get("MINICLIP_HUB_DIR"):
        return Path(os.environ["MINICLIP_HUB_DIR"])
    if HUB_DIR.is_dir():
        return HUB_DIR
    from miniclip.files import cache_dir
    return cache_dir("hub")


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _is_repo_id(name: str) -> bool:
    """org/name, and not a mistyped local path (an existing first folder, or a file suffix)."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(parts[0]).exists()
            and not name.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")))


def resolve(name_or_path: str | Path) -> Path:
    """A checkpoint file or folder on disk for a path, a known name (list_known_names()) or a hub repo id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in KNOWN:
        return _fetch(name, KNOWN[name])
    if _is_repo_id(name):
        return _fetch(name, Source(repo_id=name, groups=HF_FOLDER + OPEN_CLIP_FOLDER))
    _refuse_config_name(name)
    raise FileNotFoundError(f"{name!r} is neither an existing file or folder, nor a known checkpoint name, nor a "
                            f"Hugging Face repo id (org/name). Known names: {', '.join(list_known_names())}")


def checkpoints_for_config(config_name: str) -> list[str]:
    """Known checkpoint names of a model config (an architecture): TinyCLIP-ViT-8M-16-Text-3M ->
    [TinyCLIP-ViT-8M-16-Text-3M-YFCC15M]; a name that is both (OpenAI-ViT-B-32) -> itself."""
    return sorted(n for n in KNOWN if n == config_name or n.startswith(config_name + "-"))


def _refuse_config_name(name: str) -> None:
    """A model config name given where a checkpoint is wanted: say which checkpoints exist for it."""
    from miniclip.config import list_model_configs
    if name not in list_model_configs():
        return
    known = checkpoints_for_config(name)
    fix = f"or --model_config {name} to train it from scratch (random init)"
    if known:
        raise FileNotFoundError(f"{name!r} is a model config (an architecture), not a checkpoint; the known "
                                f"checkpoint(s) for it: {', '.join(known)}. Pass one of those to --pretrained, {fix}")
    raise FileNotFoundError(f"{name!r} is a model config (an architecture) with no known published checkpoint. "
                            f"Pass a checkpoint file or folder to --pretrained, {fix}")


def _local(folder: Path, source: Source) -> Path | None:
    """An already-present checkpoint in folder: a complete file group, or the release file."""
    for group in source.groups:
        if all((folder / f).is_file() for f in group):
            return folder / group[0] if len(group) == 1 else folder
    if source.url and (folder / source.url.rsplit("/", 1)[1]).is_file():
        return folder / source.url.rsplit("/", 1)[1]
    return None


def _fetch(name: str, source: Source) -> Path:
    folder = hub_dir() / name.replace("/", "--")
    found = _local(folder, source)
    if found is not None:
        return found
    from huggingface_hub.errors import LocalEntryNotFoundError
    errors = []
    if source.repo_id:
        for group in source.groups:
            try:
                return _download_group(source.repo_id, group, folder)
            except Exception as e:  # a file missing from the repo: try the next alternative
                errors.append(f"{source.repo_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if isinstance(e, LocalEntryNotFoundError):  # offline or hub unreachable: other groups fail alike
                    break
    if source.url and not _offline():
        try:
            return _download_url(source.url, folder)
        except Exception as e:
            errors.append(f"{source.url}: {type(e).__name__}: {e}")
    raise FileNotFoundError(_placement_help(name, source, folder, errors))


def _download_group(repo_id: str, group: tuple, folder: Path) -> Path:
    from huggingface_hub import hf_hub_download
    # HF_ENDPOINT is read per call (huggingface_hub reads it once at import): mirrors, and tests' local hub.
    kwargs = dict(local_dir=folder, local_files_only=_offline(), endpoint=os.environ.get("HF_ENDPOINT") or None)
    paths = [Path(hf_hub_download(repo_id, f, **kwargs)) for f in group]
    for optional in OPTIONAL_FILES:
        try:
            hf_hub_download(repo_id, optional, **kwargs)
        except Exception:
            pass  # most repos have none
    return paths[0] if len(group) == 1 else folder


def _download_url(url: str, folder: Path) -> Path:
    """Plain HTTPS download with a progress bar, written atomically."""
    from huggingface_hub.file_download import http_get
    from miniclip.files import atomic_write
    target = folder / url.rsplit("/", 1)[1]

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            http_get(url, f, displayed_filename=target.name)

    atomic_write(target, write)
    return target


def _placement_help(name: str, source: Source, folder: Path, errors: list[str]) -> str:
    options = []
    if source.repo_id:
        for group in source.groups:
            files = " + ".join(group)
            options.append(f"{files} from https://huggingface.co/{source.repo_id}")
    if source.url:
        options.append(f"{source.url.rsplit('/', 1)[1]} from {source.url}")
    lines = [f"checkpoint {name!r} is not in {folder} and could not be downloaded"
             + (" (offline: HF_HUB_OFFLINE is set)" if _offline() else "") + ".",
             f"Fix: place one of these into {folder}/ (same file names):"]
    lines += [f"  - {option}" for option in options]
    if errors:
        lines.append("Download errors: " + " | ".join(errors[:3]))
    return "\n".join(lines)

"""The search page serves exactly what it indexed: `python -m miniclip.apps.demo` in a subprocess, asked over raw HTTP
(http.client sends the path as written: `..`, percent-encoded and double-encoded tricks reach the server unchanged)
for every other file inside and outside the image folder. The result images and the page's own uploads are served
(200, the same bytes); everything else is refused (403 / 404)."""
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="gradio not installed: pip install -e '.[demo]'")

from miniclip.checkpoints import save_pretrained  # noqa: E402
from miniclip.tokenizer import get_tokenizer  # noqa: E402
from tests.test_demo import COLOURS, make_image_set, tiny_model  # noqa: E402
from processes import free_port, stop

REPO = Path(__file__).resolve().parent.parent
API = "/gradio_api"
REFUSED = (403, 404)


class Page:
    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get(self, path: str):
        return self.request("GET", path)

    def call(self, api_name: str, data: list):
        """Gradio's HTTP API: POST starts the event, GET streams it; -> the outputs of the `complete` event."""
        status, body = self.request("POST", f"{API}/call/{api_name}", json.dumps({"data": data}).encode(),
                                    {"Content-Type": "application/json"})
        assert status == 200, body
        status, stream = self.get(f"{API}/call/{api_name}/{json.loads(body)['event_id']}")
        lines = stream.decode().splitlines()
        assert "event: complete" in lines, stream
        return json.loads(lines[lines.index("event: complete") + 1][len("data: "):])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_http")
    captions = make_image_set(root / "data")
    images = root / "data" / "images"
    # Beside the photos: things that must never be served.
    (images / "notes.txt").write_text("private notes")
    (images / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(images / "unlisted.png")  # an image, but not in the caption file
    (images / "broken.png").write_bytes(b"listed, but not an image")
    entries = json.loads(captions.read_text()) + [{"image": "images/broken.png", "caption": ["broken"]}]
    captions.write_text(json.dumps(entries))
    model = tiny_model()
    checkpoint = save_pretrained(model, root / "checkpoint", tokenizer=get_tokenizer(model.config))
    port, log = free_port(), root / "demo.log"
    command = [sys.executable, "-m", "miniclip.apps.demo", "--checkpoint", str(checkpoint), "--data", str(captions),
               "--port", str(port), "--top_k", "3", "--no_cache"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_TEMP")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(REPO))
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    page = Page(port)
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"demo exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if page.get("/")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo did not answer within 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield page, root
    finally:
        stop(process)


def file_url(path) -> str:
    return f"{API}/file={path}"


def search(page: Page, query: str) -> list[dict]:
    gallery, status = page.call("text_search", [query, 3])
    assert status.startswith(f"Top 3 of {len(COLOURS)} images"), status
    return gallery


def test_result_images_are_served_with_their_bytes(demo):
    page, root = demo
    gallery = search(page, "a red square")
    assert len(gallery) == 3
    for item in gallery:
        url = urllib.parse.urlparse(item["image"]["url"]).path  # /gradio_api/file=/tmp/.../0000003-blue.png
        status, body = page.get(url)
        name = Path(urllib.parse.unquote(url)).name.split("-", 1)[1]
        assert status == 200 and body == (root / "data" / "images" / name).read_bytes()


def test_only_indexed_files_are_served(demo):
    page, root = demo
    images = root / "data" / "images"
    served = Path(urllib.parse.unquote(urllib.parse.urlparse(search(page, "a blue square")[0]["image"]["url"]).path)
                  .split("file=", 1)[1])
    quote = urllib.parse.quote
    refused = [
        images / "notes.txt", images / "id_rsa", images / "unlisted.png", images / "broken.png",
        images / "red.png",  # an indexed image at its own path: only the copy the page made is served
        root / "data" / "captions.json", root / "checkpoint" / "model.safetensors", Path("/etc/passwd"),
        Path(REPO / "pyproject.toml"), "pyproject.toml", "tests/test_demo_http.py",  # relative to the server's cwd
        f"{served.parent}/../../../../../etc/passwd", f"{served.parent}/../{served.parent.name}/../../",
        f"{served}/../../../../{images.relative_to('/')}/notes.txt",
    ]
    for target in refused:
        assert page.get(file_url(target))[0] in REFUSED, target
    tricks = [  # percent-encoded, double-encoded and backslash spellings of the same escapes
        file_url(quote(f"{served.parent}/../../../../../etc/passwd", safe="")),
        file_url(f"{served.parent}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
        file_url(f"{served.parent}/%252e%252e/%252e%252e/%252e%252e/%252e%252e/etc/passwd"),
        file_url(f"{served.parent}/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd"),
        file_url(f"{served.parent}\\..\\..\\..\\..\\..\\etc\\passwd"),
        file_url(f"{served}%00.png"), file_url(quote(str(images / "notes.txt"))),
        f"/file={images / 'notes.txt'}", f"{API}/file=//{images.relative_to('/')}/notes.txt",
        f"{API}/file=file://{images / 'notes.txt'}",
    ]
    for path in tricks:
        status, body = page.get(path)
        assert status in REFUSED and b"private notes" not in body and b"root:" not in body, path


def test_files_of_other_gradio_apps_are_not_served(demo, tmp_path):
    """The default GRADIO_TEMP_DIR (/tmp/gradio) is shared by every Gradio app on the machine; the page uses its own."""
    page, _ = demo
    import tempfile
    other = Path(tempfile.gettempdir()) / "gradio" / "miniclip-test-other-app"
    other.mkdir(parents=True, exist_ok=True)
    (other / "upload.txt").write_text("someone else's upload")
    try:
        assert page.get(file_url(other / "upload.txt"))[0] in REFUSED
    finally:
        (other / "upload.txt").unlink()
        other.rmdir()


def test_the_pages_own_uploads_are_served(demo):
    page, root = demo
    boundary = "miniclipboundary"
    content = (root / "data" / "images" / "green.png").read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"query.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    status, answer = page.request("POST", f"{API}/upload", body,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer
    uploaded = json.loads(answer)[0]
    status, served = page.get(file_url(uploaded))
    assert status == 200 and served == content


def test_only_loopback_hosts_count_as_private():
    from miniclip.apps.demo import is_loopback
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.20", "example.org"]))

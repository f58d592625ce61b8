"""Downloads from a loopback HTTP server: cache keyed by URL, atomic, verified, never hanging."""

import http.server
import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

import vit_keras
from conftest import assert_close
from vit_keras import checkpoint, download, presets
from vit_keras.checkpoint import read_npz


class Server:
    """A loopback HTTP server whose routes are `{path: bytes}`; `/short/...` sends half and hangs up."""

    def __init__(self, routes):
        self.routes = routes
        self.hits = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path.startswith("/short/"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_same_file_name_under_two_urls_is_two_cache_entries(keras_home, tiny_vit, tiny_r50):
    """imagenet21k/X.npz and imagenet21k+imagenet2012/X.npz must not return each other."""
    vit, r50 = tiny_vit.params.read_bytes(), tiny_r50.params.read_bytes()
    server = Server({"/imagenet21k/ViT-B_16.npz": vit, "/imagenet21k+imagenet2012/ViT-B_16.npz": r50})
    added = [presets.Preset("tiny", "imagenet21k", f"{server.url}/imagenet21k/ViT-B_16.npz", 32),
             presets.Preset("tiny", "imagenet21k+imagenet2012",
                            f"{server.url}/imagenet21k+imagenet2012/ViT-B_16.npz", 64)]
    presets.PRESETS.extend(added)
    try:
        a = checkpoint.resolve("imagenet21k", model="tiny")
        b = checkpoint.resolve("imagenet21k+imagenet2012", model="tiny")
        assert a != b and os.path.basename(a) == os.path.basename(b) == "ViT-B_16.npz"
        with open(a, "rb") as f:
            assert f.read() == vit
        with open(b, "rb") as f:
            assert f.read() == r50
        # From the cache now: same answers, no new requests.
        hits = len(server.hits)
        assert checkpoint.resolve("imagenet21k+imagenet2012", model="tiny") == b
        assert len(server.hits) == hits
        # And the models built from them are the two different models.
        model = vit_keras.build_model(weights=b, **tiny_r50.config())
        assert_close(model(tiny_r50.images), tiny_r50.expected["logits"], 2e-5)
    finally:
        del presets.PRESETS[-2:]
        server.close()


def test_interrupted_download_leaves_no_cache_entry(keras_home, tiny_vit):
    server = Server({"/short/params.npz": tiny_vit.params.read_bytes()})
    url = f"{server.url}/short/params.npz"
    try:
        with pytest.raises(download.DownloadError, match=f"Could not download {url}"):
            download.fetch(url, timeout=5, retries=1)
    finally:
        server.close()
    assert len(server.hits) == 2  # one retry
    folder = os.path.dirname(download.cache_path(url))
    assert not os.path.exists(download.cache_path(url))
    assert os.listdir(folder) == []  # no temporary download left behind


def test_corrupt_cache_entry_is_fetched_again(keras_home, tiny_vit, caplog):
    body = tiny_vit.params.read_bytes()
    server = Server({"/tiny/params.npz": body})
    url = f"{server.url}/tiny/params.npz"
    cached = download.cache_path(url)
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as f:
        f.write(body[:1000])  # what a crashed writer of another tool might leave
    try:
        with caplog.at_level(logging.WARNING, logger="vit_keras"):
            path = checkpoint.resolve(url)
    finally:
        server.close()
    assert path == cached and f"Cached {cached} is corrupt" in caplog.text
    with open(path, "rb") as f:
        assert f.read() == body


def test_silent_server_times_out_with_the_url(keras_home):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x/params.npz"
    start = time.monotonic()
    try:
        with pytest.raises(download.DownloadError) as err:
            download.fetch(url, timeout=0.5, retries=1)
    finally:
        listener.close()
    assert time.monotonic() - start < 20
    assert url in str(err.value) and "2 attempts" in str(err.value)
    assert not os.path.exists(download.cache_path(url))


def test_refused_connection_is_one_line(keras_home):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/params.npz"
    with pytest.raises(download.DownloadError) as err:
        checkpoint.resolve(url)
    text = str(err.value)
    assert "\n" not in text and url in text and "refused" in text.lower()


def test_position_embedding_resized_when_the_grid_differs_at_equal_token_count(tiny_vit):
    """A 2x2 checkpoint grid in a 1x4 model (also 4 tokens) is resized, not reused as is."""
    import scipy.ndimage

    model = tiny_vit.model(image_size=(16, 64))
    posemb = read_npz(tiny_vit.params)[checkpoint.POSEMB_KEY]
    zoomed = scipy.ndimage.zoom(posemb[0, 1:].reshape(2, 2, -1), (1 / 2, 4 / 2, 1), order=1)
    expected = np.concatenate([posemb[:, :1], zoomed.reshape(1, 4, -1)], axis=1)
    assert_close(model.get_layer("embeddings").pos_embedding.numpy(), expected, 1e-6)
    # A non-square checkpoint grid is taken as given.
    model = tiny_vit.model(image_size=(32, 32))
    with pytest.raises(ValueError, match="does not hold"):
        checkpoint.load_npz(model, str(tiny_vit.params), checkpoint_grid=(3, 1))
    checkpoint.load_npz(model, str(tiny_vit.params), checkpoint_grid=(1, 4))
    zoomed = scipy.ndimage.zoom(posemb[0, 1:].reshape(1, 4, -1), (2 / 1, 2 / 4, 1), order=1)
    assert_close(model.get_layer("embeddings").pos_embedding.numpy()[0, 1:], zoomed.reshape(4, -1), 1e-6)

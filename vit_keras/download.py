"""Downloads into a cache keyed by the whole URL, written atomically and verified."""

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse

import keras

logger = logging.getLogger("vit_keras")

TIMEOUT = 30.0  # seconds to connect, and between two reads
RETRIES = 2  # further attempts after a failed one


class DownloadError(ConnectionError):
    """A download failed: the URL could not be reached, stalled or came back wrong."""


def cache_root():
    """`$KERAS_HOME/vit_keras` (default `~/.keras/vit_keras`)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "vit_keras")


def cache_path(url):
    """Where `url` is cached: a folder per URL (hash of the whole URL), then its file name.

    Two URLs with the same file name (`imagenet21k/ViT-B_16.npz` and
    `imagenet21k+imagenet2012/ViT-B_16.npz`) never share an entry.

    >>> a = cache_path("https://h/imagenet21k/ViT-B_16.npz")
    >>> b = cache_path("https://h/imagenet21k+imagenet2012/ViT-B_16.npz")
    >>> a != b and os.path.basename(a) == os.path.basename(b) == "ViT-B_16.npz"
    True
    """
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:20]
    return os.path.join(cache_root(), key, name)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _socket_timeout(seconds):
    # keras.utils.get_file reads with urllib, which takes its timeout from the socket default.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reason(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def fetch(url, sha256=None, check=None, timeout=TIMEOUT, retries=RETRIES):
    """Returns a local copy of `url`, downloading it once into the cache.

    The download goes to a temporary folder and becomes the cache entry only
    once it is complete, matches `sha256` (when given) and passes `check(path)`
    (a callable that raises ValueError for a bad file). A cached entry that
    fails these checks is fetched again. Each attempt has connect/read
    timeouts; after `retries` more attempts a `DownloadError` names the URL.

    Args:
        url: str. An http(s) URL.
        sha256: str or None. Expected hex digest of the file. Defaults to None.
        check: callable or None. `check(path)` raises ValueError if the file is
            unusable. Defaults to None.
        timeout: float. Seconds to connect and between reads. Defaults to 30.
        retries: int. Further attempts after a failure. Defaults to 2.
    """
    final = cache_path(url)

    def verify(path):
        if sha256 is not None and sha256_of(path) != sha256.lower():
            raise ValueError(f"{path}: sha256 {sha256_of(path)} does not match the expected {sha256}")
        if check is not None:
            check(path)

    if os.path.exists(final):
        try:
            verify(final)
            return final
        except ValueError as e:
            logger.warning("Cached %s is corrupt (%s); fetching %s again.", final, _reason(e), url)
            os.remove(final)
    cache = os.path.dirname(final)
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as e:  # KERAS_HOME names a file, a read-only folder, ...
        raise DownloadError(f"Cannot create the download cache {cache} for {url}: {e.strerror or e} "
                            "(the cache is under KERAS_HOME, default ~/.keras).") from None
    errors = []
    for attempt in range(1 + retries):
        tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(final))
        try:
            with _socket_timeout(timeout):
                path = keras.utils.get_file(
                    fname=os.path.basename(final), origin=url, cache_dir=tmp, cache_subdir=""
                )
            verify(path)
            os.replace(path, final)
            return final
        except ValueError as e:  # complete, but not the file we want: no point retrying
            raise DownloadError(f"Download of {url} is corrupt: {_reason(e)}") from None
        except Exception as e:  # get_file raises bare Exceptions
            errors.append(_reason(e))
            logger.warning("Download of %s failed (attempt %d of %d): %s", url, attempt + 1,
                           1 + retries, errors[-1])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise DownloadError(f"Could not download {url}: {errors[-1]} (after {1 + retries} attempts).")
